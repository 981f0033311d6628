import sys, time, json, logging
sys.path[:0] = ["/tmp/proto/src", "/tmp/proto/tests"]
pass
import os; os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray, torch
from pathlib import Path
import synthetic
from simrun import TIMING_FREE, config, make_assets, rounded
from splitft.federation.coordinator import Coordinator
from splitft.federation.simulation import SimulatedRounds
from splitft.federation.ray_rounds import RayRounds

root = Path("/tmp/proto_assets"); root.mkdir(exist_ok=True)
assets = make_assets(root)
t0 = time.perf_counter()
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
print("ray.init", round(time.perf_counter() - t0, 1), "s")
side, timing = sys.argv[1], sys.argv[2]
extra = sys.argv[3:]
out = {}
for backend in ("local", "ray"):
    tmp = Path(f"/tmp/proto_runs/{side}-{timing}-{backend}"); tmp.mkdir(parents=True, exist_ok=True)
    cfg = config(assets, tmp, f"name={backend}", "federation.policy=adaptive", f"federation.server_side={side}", f"sim.timing={timing}", *extra)
    runner = SimulatedRounds() if backend == "local" else RayRounds(hosts=2, resources={"num_cpus": 1})
    t0 = time.perf_counter()
    coord = Coordinator(cfg, runner, costs=synthetic.costs(num_layers=4))
    summary = coord.run(table=False)
    wall = time.perf_counter() - t0
    out[backend] = (summary, {k: v.clone() for k, v in coord.server.global_state.items()}, wall)
(sa, ga, wa), (sb, gb, wb) = out["local"], out["ray"]
recs = [[rounded({k: v for k, v in r.items() if k not in TIMING_FREE}) for r in s["rounds"]] for s in (sa, sb)]
same = all(a == b for a, b in zip(*recs, strict=True))
diff = max((ga[k] - gb[k]).abs().max().item() for k in ga)
print(f"{side}/{timing} {extra}: records equal (timing-free, 7 digits): {same}; sim_round_s local={[r.get('sim_round_s') for r in sa['rounds'][1:]]} ray={[r.get('sim_round_s') for r in sb['rounds'][1:]]}; max|adapter diff|={diff:.2e}; wall local={wa:.1f}s ray={wb:.1f}s")
if not same:
    for a, b in zip(*recs):
        d = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
        if d: print("  diff:", str(d)[:600])
ray.shutdown()
