"""Uplink and downlink bytes per round for each strategy, against full fine-tuning.

Plays a few rounds of every registered strategy with the server's own hooks (``synthetic.py``): the
arrays that travel are exactly those a run sends and counts in ``rounds.jsonl`` (``payload_bytes``:
raw float32 data plus a small header per array). Full fine-tuning sends every parameter of the
classifier both ways. Usage: ``python benchmarks/traffic.py [--clients 10] [--rounds 3]
[--set lora.rank=16 ...]``.
"""

from __future__ import annotations

import argparse

from synthetic import aggregate, config, full_model_bytes, make_strategy, play_round

from strategies.registry import available


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10, help="clients per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds played (FedEx-LoRA grows after 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    args = parser.parse_args()
    clients = list(range(args.clients))
    full = full_model_bytes(config("fedit", args.overrides)) * args.clients
    print(f"{args.clients} clients per round; MB per round (last round; round 1 in brackets if different)")
    print(f"{'strategy':<12} {'uplink MB':>14} {'downlink MB':>16} {'up / full':>10} {'down / full':>12}")
    for name in available():
        strategy = make_strategy(config(name, args.overrides))
        rows = []
        for server_round in range(1, args.rounds + 1):
            played = play_round(strategy, server_round, clients)
            aggregate(strategy, played)
            rows.append((played.uplink_bytes, played.downlink_bytes))
        (up1, down1), (up, down) = rows[0], rows[-1]
        print(f"{name:<12} {_mb(up, up1):>14} {_mb(down, down1):>16} {up / full:>10.4f} {down / full:>12.4f}")
    print(f"{'full FT':<12} {_mb(full, full):>14} {_mb(full, full):>16} {1:>10.4f} {1:>12.4f}")


def _mb(last: int, first: int) -> str:
    text = f"{last / 1e6:.3f}"
    return text if last == first else f"{text} ({first / 1e6:.3f})"


if __name__ == "__main__":
    main()
