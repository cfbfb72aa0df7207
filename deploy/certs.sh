#!/usr/bin/env bash
# Generate the TLS material and the SuperNode key pairs for docker-compose.yml (or any deployment).
#
#   deploy/certs.sh [DIR] [NODES] [HOSTNAME ...]
#
# DIR (default: deploy/certs) receives
#   ca.crt, ca.key             a private certificate authority (keep ca.key offline)
#   superlink.crt/.key         the SuperLink's certificate, valid for "superlink", "localhost",
#                              127.0.0.1 and every HOSTNAME given (the names SuperNodes dial)
#   supernode-N, supernode-N.pub   one ECDSA P-384 key pair per SuperNode, N = 0..NODES-1 (default 3)
# TLS uses openssl only. Flower 1.42 reads SuperNode keys in OpenSSH format, which openssl cannot write,
# so the node keys come from ssh-keygen (OpenSSH; installed wherever openssl is, almost always).
# Existing files are never overwritten: remove DIR to start again.
set -euo pipefail

dir=${1:-deploy/certs}
nodes=${2:-3}
shift $(( $# > 2 ? 2 : $# ))
days=365

for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found; install it (Debian: apt-get install openssl openssh-client)" >&2; exit 2; }
done
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || { echo "error: NODES must be a positive integer, got '$nodes'" >&2; exit 2; }
if [[ -e "$dir/ca.key" || -e "$dir/superlink.key" || -e "$dir/supernode-0" ]]; then
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

# One authentication key pair per SuperNode (register the .pub files with `flwr supernode register`).
for ((i = 0; i < nodes; i++)); do
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "$dir/supernode-$i"
done

# Private keys stay 0600. The containers run as UID 1000: on each host, `chown 1000 <key>` for the
# keys that host mounts (see docs/deploy.md).
chmod 644 "$dir"/*.crt "$dir"/*.pub
chmod 600 "$dir"/*.key
for ((i = 0; i < nodes; i++)); do chmod 600 "$dir/supernode-$i"; done
echo "wrote $dir: ca.crt, superlink.crt/.key ($san), $nodes SuperNode key pairs"
