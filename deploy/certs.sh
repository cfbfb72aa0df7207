#!/usr/bin/env bash
# The operator's TLS material for docker-compose.yml (or any deployment): a CA and the SuperLink's
# certificate. SuperNode keys are NOT made here: each data owner makes its own with
# `fedlora deploy keygen` and sends the operator only the public key (see docs/deploy.md).
#
#   deploy/certs.sh [DIR] [HOSTNAME ...]
#   deploy/certs.sh --local-demo NODES [DIR] [HOSTNAME ...]
#
# DIR (default: deploy/certs) receives
#   ca.crt, ca.key             a private certificate authority (keep ca.key offline)
#   superlink.crt/.key         the SuperLink's certificate, valid for "superlink", "localhost",
#                              127.0.0.1 and every HOSTNAME given (the names SuperNodes dial)
# --local-demo NODES: a one-machine rehearsal where one person plays every data owner; also writes
#   DIR/nodes/supernode-N and supernode-N.pub (N = 0..NODES-1), ECDSA P-384 in OpenSSH format, the
#   kind Flower 1.42 reads. Never use it for a real federation: a node's private key must be made on
#   the node's machine.
# TLS uses openssl only; node keys (demo mode) come from ssh-keygen, because openssl cannot write
# OpenSSH keys. Existing files are never overwritten: remove DIR to start again.
set -euo pipefail

demo_nodes=0
if [[ "${1:-}" == "--local-demo" ]]; then
  demo_nodes=${2:-}
  [[ "$demo_nodes" =~ ^[1-9][0-9]*$ ]] || {
    echo "error: --local-demo needs a positive number of nodes, got '$demo_nodes' (e.g. --local-demo 3)" >&2
    exit 2
  }
  shift 2
fi
dir=${1:-deploy/certs}
shift $(( $# > 0 ? 1 : 0 ))
days=365

if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  echo "error: '$1' is not a host name; node keys are no longer made here (each data owner runs" \
    "'fedlora deploy keygen'); for a one-machine rehearsal use: deploy/certs.sh --local-demo $1 $dir" >&2
  exit 2
fi
tools=(openssl)
((demo_nodes == 0)) || tools+=(ssh-keygen)
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found; install it (Debian: apt-get install openssl openssh-client)" >&2; exit 2; }
done
if [[ -e "$dir/ca.key" || -e "$dir/superlink.key" || -e "$dir/nodes" ]]; then
  echo "error: $dir already holds keys; remove it (or choose another DIR) to generate new ones" >&2
  exit 1
fi
mkdir -p "$dir"
umask 077

# Certificate authority.
openssl ecparam -name secp384r1 -genkey -noout -out "$dir/ca.key" 2>/dev/null
openssl req -x509 -new -key "$dir/ca.key" -sha256 -days "$days" -subj "/CN=fedlora CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$dir/ca.crt"

# SuperLink certificate, with every name SuperNodes and the flwr CLI may use to reach it.
san="DNS:superlink,DNS:localhost,IP:127.0.0.1"
for host in "$@"; do
  if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then san+=",IP:$host"; else san+=",DNS:$host"; fi
done
openssl ecparam -name secp384r1 -genkey -noout -out "$dir/superlink.ec" 2>/dev/null
openssl pkcs8 -topk8 -nocrypt -in "$dir/superlink.ec" -out "$dir/superlink.key"
rm -f "$dir/superlink.ec"
openssl req -new -key "$dir/superlink.key" -subj "/CN=superlink" -out "$dir/superlink.csr"
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' "$san" \
  > "$dir/superlink.ext"
openssl x509 -req -in "$dir/superlink.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days "$days" -sha256 -extfile "$dir/superlink.ext" -out "$dir/superlink.crt" 2>/dev/null
rm -f "$dir/superlink.csr" "$dir/superlink.ext" "$dir/ca.srl"
openssl verify -CAfile "$dir/ca.crt" "$dir/superlink.crt" >/dev/null

# Private keys stay 0600. The containers run as UID 1000: `chown 1000 superlink.key` on the operator's
# machine (see docs/deploy.md).
chmod 644 "$dir"/*.crt
chmod 600 "$dir"/*.key
echo "wrote $dir: ca.crt (send it to every data owner), ca.key (keep offline), superlink.crt/.key ($san)"

# Local demo only: every node's key pair, made here because one person plays every data owner.
if ((demo_nodes > 0)); then
  mkdir -p "$dir/nodes"
  for ((i = 0; i < demo_nodes; i++)); do
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "$dir/nodes/supernode-$i"
    chmod 644 "$dir/nodes/supernode-$i.pub"
  done
  echo "local demo: wrote $demo_nodes SuperNode key pairs in $dir/nodes (never do this for a real federation)"
fi
