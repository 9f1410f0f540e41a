"""Loss-curve PNG from WORKDIR/metrics.jsonl: python -m ovenc_jax.train.plot_metrics --workdir DIR --output loss.png."""
import argparse
import json

from ovenc_format import atomic_io
from ovenc_format import paths as pathio

# A bare Figure renders with Agg and leaves pyplot's global backend alone.
from matplotlib.figure import Figure


def read_metrics(workdir: str) -> tuple[dict[int, float], dict[str, dict[int, float]]]:
  """Per-step loss (last write wins, so a resumed run overwrites the steps it replays) and eval series."""
  path = pathio.join(workdir, "metrics.jsonl")
  if not pathio.exists(path):
    raise FileNotFoundError(f"{path} not found: has the trainer run in {workdir}?")
  loss, evals = {}, {}
  with pathio.as_path(path).open() as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        loss[row["step"]] = row["loss"]
      for k, v in row.items():
        if k.startswith("eval/"):
          evals.setdefault(k, {})[row["step"]] = v
  return loss, evals


def plot(workdir: str, output: str) -> str:
  loss, evals = read_metrics(workdir)
  fig = Figure(figsize=(10 if evals else 5, 3.5))
  axes = fig.subplots(1, 2 if evals else 1, squeeze=False)
  steps = sorted(loss)
  axes[0, 0].plot(steps, [loss[s] for s in steps])
  axes[0, 0].set(xlabel="step", ylabel="cluster-discrimination loss", title="training loss")
  for name, series in evals.items():
    xs = sorted(series)
    axes[0, 1].plot(xs, [series[s] for s in xs], marker="o", label=name[5:])
  if evals:
    axes[0, 1].set(xlabel="step", ylabel="accuracy", title="held-out evaluation")
    axes[0, 1].legend()
  fig.tight_layout()
  # A local temp file renamed into place, or uploaded for a gs:// output.
  atomic_io.atomic_write(output, lambda f: fig.savefig(f, dpi=100, format="png"))
  return output


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m ovenc_jax.train.plot_metrics", description=__doc__)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--output", required=True)
  args = ap.parse_args(argv)
  print(plot(args.workdir, args.output))


if __name__ == "__main__":
  main()
