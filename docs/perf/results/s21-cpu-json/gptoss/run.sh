#!/bin/bash
# gpt-oss-20b (hidden / intermediate 2880: a last 64-input activation group) after the padded
# last group: old = main at 70e84b1, new (s21e); bf16 once a round. Two rounds.
for r in 1 2; do
  /tmp/moe-s21e bench --shapes gpt-oss-20b --tokens 16,64,256 --no-reference --min-time 1.5 --json gptoss/r$r-bf16.json 2>&1 | grep gpt-oss | sed "s/^/r$r bf16 /"
  for q in mxfp4 int8-channel; do
    for b in old s21e; do
      /tmp/moe-$b bench --shapes gpt-oss-20b --tokens 16,64,256 --no-reference --min-time 1.5 --quant $q --json gptoss/r$r-$q-$b.json 2>&1 | grep gpt-oss | sed "s/^/r$r $q $b /"
    done
  done
done
