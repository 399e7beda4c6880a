#!/bin/sh
# Render users.acl.in into a private ACL file, then exec redis-server with it.
#   EMBEDQ_REDIS_<ROLE>_PASSWORD       the password of a role's user, or
#   EMBEDQ_REDIS_<ROLE>_PASSWORD_FILE  a file holding it (Docker/K8s secrets)
#   EMBEDQ_ACL_TEMPLATE / EMBEDQ_ACL_FILE   paths (defaults below)
# Every role must have a password: a missing one stops the start, rather than leaving a
# user open. Extra arguments go to redis-server.
set -eu
template="${EMBEDQ_ACL_TEMPLATE:-$(dirname "$0")/users.acl.in}"
out="${EMBEDQ_ACL_FILE:-/data/users.acl}"
umask 077
tmp="$out.tmp"
# ACL files take no comments or blank lines: the template's are dropped here.
sed -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' "$template" > "$tmp"
for role in ADMIN PRODUCER GATEWAY WORKER METRICS; do
  eval "password=\${EMBEDQ_REDIS_${role}_PASSWORD:-}"
  eval "password_file=\${EMBEDQ_REDIS_${role}_PASSWORD_FILE:-}"
  if [ -z "$password" ] && [ -n "$password_file" ]; then
    password="$(cat "$password_file")"
  fi
  if [ -z "$password" ]; then
    echo "entrypoint: set EMBEDQ_REDIS_${role}_PASSWORD (or _PASSWORD_FILE)" >&2
    rm -f "$tmp"
    exit 64
  fi
  hash="$(printf '%s' "$password" | sha256sum | cut -d' ' -f1)"
  sed -i "s/@${role}@/#${hash}/" "$tmp"
done
mv "$tmp" "$out"
exec redis-server --aclfile "$out" "$@"
