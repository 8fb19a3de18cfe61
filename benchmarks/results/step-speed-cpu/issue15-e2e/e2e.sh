#!/usr/bin/env bash
# e2e.sh ROOT LABEL TASK STRATEGY   (TASK: digits | r8)
root=$1; label=$2; task=$3; strat=$4
py=/root/.cache/prunequant-env/venv-9f669024bb50af8e/bin/python
if [ "$task" = digits ]; then model=/work/main/samples/digits/model.onnx; data=/work/main/samples/digits/train.npz; test=/work/main/samples/digits/test.npz
else model=/tmp/ss/r8/model.onnx; data=/tmp/ss/r8/train.npz; test=/tmp/ss/r8/test.npz; fi
out=/tmp/ss/e2e/$label-$task-$strat; rm -rf $out; mkdir -p $out
cd $root
start=$(date +%s.%N)
/usr/bin/time -f "%e wall %U user %S sys" -o $out/time.txt nice -n 5 $py -c "import sys; sys.path.insert(0, '$root'); sys.argv[0]='prunequant'; from plugin.cli import main; sys.exit(main())" \
  compress $model --data $data -o $out/m.onnx --epochs 12 --finetune-epochs 6 --strategy $strat --target size=25% --no-progress > $out/log.txt 2>&1
echo "rc $?" >> $out/time.txt
$py -c "import sys; sys.path.insert(0, '$root'); sys.argv[0]='prunequant'; from plugin.cli import main; sys.exit(main())" evaluate $out/m.onnx --data $test > $out/eval.txt 2>&1
echo "$label $task $strat $(cat $out/time.txt | tr '\n' ' ') load $(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/ss/e2e/summary.txt
