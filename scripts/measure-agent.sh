#!/bin/bash
# Usage: cargo build --release && scripts/measure-agent.sh   (ports 5300, 55xx, 56xx, 5964)
# Measures loupe agent: start time, idle RSS, RSS and throughput under load, RSS with a stalled upstream.
B="${LOUPE_BIN:-target/release/loupe}"
D=$(mktemp -d)
rss() { grep -E "VmRSS|VmHWM" /proc/$1/status | tr -s ' ' | tr '\n' ' '; echo; }
$B standalone --data-dir $D/s --grpc-addr 127.0.0.1:5517 --http-addr 127.0.0.1:5518 --query-addr 127.0.0.1:5300 > $D/s.out 2> $D/s.log &
SP=$!
sleep 3
t0=$(date +%s%N)
$B agent --upstream http://127.0.0.1:5517 --grpc-addr 127.0.0.1:5617 --http-addr 127.0.0.1:5618 --metrics-addr 127.0.0.1:5964 > $D/a.out 2> $D/a.log &
AP=$!
until curl -sf 127.0.0.1:5964/health > /dev/null; do sleep 0.01; done
t1=$(date +%s%N)
echo "agent ready (health answers) after $(( (t1 - t0) / 1000000 )) ms; $(head -1 $D/a.out)"
sleep 5
echo "idle: $(rss $AP)"
$B loadgen --endpoint http://127.0.0.1:5617 --duration 30s --concurrency 4 --batch 200 2>&1 | grep -E "spans/s|sent" | tail -3
echo "after load: $(rss $AP)"
ps -o pid,time,cmd -p $AP | tail -1
curl -s 127.0.0.1:5964/metrics | grep -E "^loupe_agent_(spans|queue)"
kill $AP; wait $AP 2>/dev/null
# Stalled upstream: nothing listens on 5519.
$B agent --upstream http://127.0.0.1:5519 --grpc-addr 127.0.0.1:5617 --http-addr 127.0.0.1:5618 --metrics-addr 127.0.0.1:5964 --max-queue-bytes 64MiB > $D/b.out 2> $D/b.log &
BP=$!
until curl -sf 127.0.0.1:5964/health > /dev/null; do sleep 0.01; done
$B loadgen --endpoint http://127.0.0.1:5617 --duration 20s --concurrency 4 --batch 200 2>&1 | grep -E "spans/s|sent" | tail -2
echo "stalled upstream, after 20 s of load: $(rss $BP)"
curl -s 127.0.0.1:5964/metrics | grep -E "^loupe_agent_(spans|queue)"
kill $BP $SP
