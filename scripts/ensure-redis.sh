#!/usr/bin/env bash
# Make sure a Redis server answers on 127.0.0.1:${REDIS_PORT:-6379}; install Debian's redis-server if missing.
set -euo pipefail
port="${REDIS_PORT:-6379}"

answers() {
  if command -v redis-cli >/dev/null; then
    redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG
  else
    # no client: speak RESP directly
    exec 3<>"/dev/tcp/127.0.0.1/$port" 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    read -r -t 2 reply <&3 || true
    exec 3>&-
    [[ "$reply" == +PONG* ]]
  fi
}

if answers; then echo "redis: answering on 127.0.0.1:$port"; exit 0; fi

if ! command -v redis-server >/dev/null; then
  echo "redis: installing Debian's redis-server"
  sudo_cmd=""
  [[ "$(id -u)" != 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq redis-server >/dev/null
fi

dir="${TMPDIR:-/tmp}/asvp-redis"
mkdir -p "$dir"
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
  --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
for _ in $(seq 1 50); do
  if answers; then echo "redis: started on 127.0.0.1:$port"; exit 0; fi
  sleep 0.1
done
echo "redis: failed to start, see $dir/redis.log" >&2
exit 1
