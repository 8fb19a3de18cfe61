import os, time, sys, numpy as np, torch
sys.path.insert(0, "/work/main")
torch.set_num_threads(1)
from plugin.data import Dataset
from plugin.engine.config import SearchConfig
from plugin.engine.fakequant import FakeQuantModel
from plugin.engine.training import FinetuneConfig, finetune
from plugin.inspect_cmd import prepare_model
from plugin.space import Precisions, SearchSpace
d = prepare_model("samples/digits/model.onnx", ["input=1x1x8x8"])
z = np.load("samples/digits/train.npz"); x = z["input"]
train, held = Dataset({"input": x[:1000]}, None), Dataset({"input": x[1000:]}, None)
def run(mb):
    os.environ["PRUNEQUANT_TEACHER_CACHE_MB"] = mb
    torch.manual_seed(0)
    space = SearchSpace(d.analysis, Precisions((8,), (8,)))
    m = FakeQuantModel.build(d.model, SearchConfig(progress=False, weight_precisions=(8,), act_bits=(8,)), space=space)
    m.calibrate(train, 64); plan = space.uniform_plan(8, 8)
    c = time.process_time()
    finetune(m, plan, train, FinetuneConfig(epochs=4, batch_size=64, progress=False, task_loss="distill_kl"), validation=held)
    return time.process_time() - c
res = {"0": [], "256": []}
for _ in range(3):
    for mb in ("0", "256"):
        res[mb].append(run(mb))
print({k: [round(v, 2) for v in vs] for k, vs in res.items()}, "load", os.getloadavg())
