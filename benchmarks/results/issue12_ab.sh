set -e
PY=/work/main/.venv/bin/python
cd /work/main
$PY -m benchmarks.stub_upstream --host 127.0.0.1 --port 18555 --tokens 16 --model stub-model > /tmp/ab/stub.log 2>&1 &
STUB=$!
sleep 2
for t in pre:/tmp/wtb:18561 post:/work/wt-after12:18562; do
  IFS=: read name dir port <<< "$t"
  printf "gateway:\n  host: 127.0.0.1\n  port: $port\n  routing: least-load\npools:\n  - id: stub\n    url: http://127.0.0.1:18555\n    models: [stub-model]\n" > /tmp/ab/$name.yaml
  (cd $dir && $PY -m gateway serve --config /tmp/ab/$name.yaml --log-level WARNING > /tmp/ab/$name.log 2>&1 &)
done
sleep 4
cat > /tmp/ab/s.lua <<'L'
wrk.method = "POST"
wrk.body = [[{"model":"stub-model","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16,"stream":true}]]
wrk.headers["Content-Type"] = "application/json"
L
sed 's/"stream":true/"stream":false/' /tmp/ab/s.lua > /tmp/ab/n.lua
for mode in s n; do
 for i in 1 2 3 4 5; do
  for p in 18561 18562; do
    r=$(wrk -t1 -c32 -d3s -s /tmp/ab/$mode.lua http://127.0.0.1:$p/v1/chat/completions | awk '/Requests\/sec/ {print $2}')
    echo "$mode $p $r"
  done
 done
done
pkill -f "/tmp/ab/pre.yaml" || true; pkill -f "/tmp/ab/post.yaml" || true; kill $STUB || true
