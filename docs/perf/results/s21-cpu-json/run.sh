#!/bin/bash
# Final A/B of session 21: old = main at 70e84b1, new = this session's build; two rounds.
for r in 1 2; do
  /tmp/moe-s21d bench --shapes qwen3-30b-a3b --tokens 16,64,128,1024 --no-reference --min-time 1.5 --json r$r-bf16.json 2>&1 | grep qwen3 | sed "s/^/r$r bf16 /"
  for q in int4-group int8-channel mxfp4 nvfp4; do
    for b in old s21d; do
      /tmp/moe-$b bench --shapes qwen3-30b-a3b --tokens 16,64,128,1024 --no-reference --min-time 1.5 --quant $q --json r$r-$q-$b.json 2>&1 | grep qwen3 | sed "s/^/r$r $q $b /"
    done
  done
done
