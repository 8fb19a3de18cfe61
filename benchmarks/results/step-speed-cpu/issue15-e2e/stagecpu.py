"""Run `prunequant compress ARGS` from ROOT, recording process CPU seconds in the search's epochs
(SearchRunner.run_epoch) and in QAT (training.finetune)."""
import sys, time, json
root, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
import plugin.engine.supernet as sn, plugin.engine.training as tr
acc = {"search_epochs_cpu": 0.0, "finetune_cpu": 0.0, "epochs": 0}
orig_epoch = sn.SearchRunner.run_epoch
def run_epoch(self, *a, **k):
    t = time.process_time(); r = orig_epoch(self, *a, **k); acc["search_epochs_cpu"] += time.process_time() - t; acc["epochs"] += 1; return r
sn.SearchRunner.run_epoch = run_epoch
orig_ft = tr.finetune
def finetune(*a, **k):
    t = time.process_time(); r = orig_ft(*a, **k); acc["finetune_cpu"] += time.process_time() - t; return r
tr.finetune = finetune
count = {"n": 0, "kinds": set()}
orig_tl = sn.task_loss
def tl(kind, *a):
    count["n"] += 1; count["kinds"].add(kind); return orig_tl(kind, *a)
sn.task_loss = tl
import plugin.api as api
if getattr(api, "finetune", None) is orig_ft: api.finetune = finetune
from plugin.cli import main
t0, c0 = time.perf_counter(), time.process_time()
sys.argv = ["prunequant"] + sys.argv[3:]
try:
    main()
except SystemExit as e:
    acc["rc"] = e.code
acc["wall"] = time.perf_counter() - t0; acc["cpu"] = time.process_time() - c0
acc["search_steps"] = count["n"]; acc["task_loss"] = sorted(count["kinds"])
json.dump(acc, open(out, "w")); print(acc)
