"""The stable flows that stalled in the fidelity grid, through ``compare`` (the engine, which holds a
converged flow fixed where its implicit solve stalls, and says so in ``message``).

In the grid rerun (float64, 600 steps) these seven stable flows ran out of their budget or
collapsed their step size on Kvaerno5+GMRES; each had converged first (its centre moved < 1e-6 of
its norm over the last 50 steps: an Adam-type stable flow at a minimum, where
``m / (sqrt(nu) + eps)`` turns sign-like as ``nu`` decays).

    python benchmarks/stalled_stable_flows.py   # writes benchmarks/results/stalled_stable_flows.json
"""
import jax; jax.config.update("jax_enable_x64", True)
import json
from pathlib import Path

import rodflow_jax as rf
from rodflow_jax.experiments import write_json
out = []
for prob, name, K in [("toy","adam",100),("toy","scalar_adam",100),("toy","nadam",100),("toy","scalar_nadam",100),("deep-linear","scalar_adam",100),("deep-linear","scalar_adam",150),("deep-linear","scalar_nadam",100)]:
    p = rf.get_problem(prob); loss, p0 = p.make(0)
    hp = {"learning_rate": p.learning_rates[name], **p.hyperparameters.get(name, {})}
    c = rf.compare(loss, p0, rf.make_optimizer(name, **hp), 600, start_step=K, models=("discrete", "stable"))
    m = c.metrics["stable"]
    row = dict(problem=prob, optimizer=name, K=K, failed=m["failed"], failed_at=m["failed_at"], message=m["message"], solver=m["solver"], err=m["param_rel_error_final"], steps=m["solver_steps"])
    print(json.dumps(row), flush=True); out.append(row)
write_json(Path("benchmarks/results/stalled_stable_flows.json"), out)
