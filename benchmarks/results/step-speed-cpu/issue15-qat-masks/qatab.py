import sys, time, statistics
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/benchmarks")
import torch, numpy as np
torch.set_num_threads(1)
import step_speed as ss
from graph_passes.prepare import prepare_model
from plugin.data import Dataset
from plugin.engine.batches import iterate_batches, task_loss
from plugin.engine.config import SearchConfig
from plugin.engine.fakequant import FakeQuantModel
from plugin.engine import quantizers as q
from plugin.space import Precisions, SearchSpace
for name, path, x, y in ss._models():
    prepared = prepare_model(str(path))
    data = Dataset({prepared.model.graph.input[0].name: x.astype(np.float32)}, y.astype(np.int64))
    config = SearchConfig(batch_size=64, progress=False, seed=0)
    space = SearchSpace(prepared.analysis, Precisions(config.weight_precisions, config.activation_precisions))
    m = FakeQuantModel.build(prepared.model, config, space=space)
    m.freeze(space.uniform_plan(4))
    opt = torch.optim.Adam(m.net_parameters(), lr=1e-4)
    batches = list(iterate_batches(data, m.input_names, 64, 0, torch.device("cpu"), 23))
    def step(b):
        loss = task_loss("distill_kl", m(*b[0]), m.teacher_outputs(*b[0]), None); opt.zero_grad(); loss.backward(); opt.step()
    runs = {"bool masks": [], "float kernels": []}
    for _ in range(7):
        for k in runs:
            q._FLOAT_MASKS_ON_CPU = k == "float kernels"
            for b in batches[:3]: step(b)
            t = time.process_time()
            for b in batches[3:]: step(b)
            runs[k].append((time.process_time() - t) / 20 * 1000)
    print(name, "QAT step CPU ms (W4A4 plan, teacher each step), median of 7 x 20, interleaved:", {k: round(statistics.median(v), 1) for k, v in runs.items()})
