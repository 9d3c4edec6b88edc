#!/usr/bin/env bash
# Makes a throwaway certificate authority and one certificate it signed, for the TLS variant of
# the compose deployment (deploy/docker-compose.tls.yml): every process of the cluster shows the
# same certificate, valid for the name `pd-cluster` (which nodes check each other against, with
# PD_TLS_SERVER_NAME, since their container addresses are not known in advance), for `etcd`,
# `localhost` and 127.0.0.1.
#
#   deploy/docker/make-certs.sh [DIR]      # default: deploy/certs
#
# For trying TLS out, not for production: the CA's key is left beside its certificate, and the
# private keys are readable by all (the containers run as an unprivileged user). With a real
# CA, mount its files in the same places instead.
set -euo pipefail

dir=${1:-"$(dirname "$0")/../certs"}
mkdir -p "$dir"
cd "$dir"
days=30
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout ca-key.pem -out ca.pem -days "$days" -subj "/CN=pd-cluster throwaway CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout node-key.pem -out node.csr -subj "/CN=pd-cluster" 2>/dev/null
cat >node.ext <<'EXT'
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=DNS:pd-cluster,DNS:etcd,DNS:localhost,IP:127.0.0.1
EXT
openssl x509 -req -in node.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
    -out node.pem -days "$days" -extfile node.ext 2>/dev/null
# rustls reads PKCS#8 keys; openssl may have written a SEC1 one.
openssl pkcs8 -topk8 -nocrypt -in node-key.pem -out node-key.pk8
mv node-key.pk8 node-key.pem
rm -f node.csr node.ext ca.srl
chmod 0644 ca.pem node.pem node-key.pem
echo "certificates in $(pwd): ca.pem, node.pem, node-key.pem" >&2
