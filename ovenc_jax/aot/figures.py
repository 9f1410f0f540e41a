"""Pod-efficiency figures from one `ovenc_jax.aot.compile` report: compute fraction, memory, communication, sharding."""


def figures(name: str, r: dict) -> dict:
  """The report's figures as plain numbers under `<name>_*` (None where the target gives no figure).

  compute_fraction = t_compute / max(t_compute, t_hbm): t_compute is the model's own FLOP count at
  the chip's peak, t_hbm XLA's bytes accessed at the chip's HBM bandwidth; XLA's bytes are an upper
  bound of the traffic, so the fraction is a lower bound. compute_fraction_hbm_traffic takes t_hbm
  from the bytes the program keeps in HBM, each counted once (ovenc_jax/aot/hlo_traffic.py).
  """
  t = r["shardings"]["tensors"]
  state = [row for group in ("params", "centers", "opt_state") for row in t[group].values()]
  state_per_device = sum(row["bytes_per_device"] for row in state)
  state_total = sum(row["bytes"] for row in state)
  fsdp = r["mesh"]["fsdp"]
  t_compute = r["model_flops_per_device"] / r["peak_flops"]
  accessed = r.get("bytes_accessed_per_device")
  t_hbm = None if accessed is None else accessed / r["hbm_bandwidth"]
  traffic = r.get("hbm_traffic_per_device")
  t_traffic = None if traffic is None else traffic / r["hbm_bandwidth"]
  coll = r.get("collectives", {}).get("by_kind", {})
  out = {
      "compute_fraction": None if t_hbm is None else t_compute / max(t_compute, t_hbm),
      "step_s_model_flops": t_compute, "step_s_hbm": t_hbm,
      "bytes_accessed_per_device": accessed, "hbm_traffic_bytes_per_device": traffic,
      "step_s_hbm_traffic": t_traffic,
      "compute_fraction_hbm_traffic": None if t_traffic is None else t_compute / max(t_compute, t_traffic),
      "model_over_xla_flops": (r["model_flops_per_device"] / r["xla_flops_per_device"]
                               if r.get("xla_flops_per_device") else None),
      "memory_gib": r["memory"]["total"] / 2 ** 30 if "memory" in r else None,
      "hbm_gib": r["hbm_bytes"] / 2 ** 30, "fits": int(bool(r["fits"])),
      "collective_bytes_per_device": sum(v["bytes"] for v in coll.values()),
      "param_bytes_per_device": sum(row["bytes_per_device"] for row in t["params"].values()),
      "param_bytes_total": sum(row["bytes"] for row in t["params"].values()),
      "param_opt_bytes_per_device": state_per_device,
      "param_opt_over_total_per_fsdp": state_per_device / (state_total / fsdp),
      "replicated_over_64mib": len(r["shardings"]["warnings"]),
      "fsdp": fsdp, "devices": r["num_devices"], "global_batch": r["global_batch"],
      "compile_s": r["compile_s"], "attention_fallback_xla": r.get("attention_fallback_xla", 0),
  }
  for kind, v in coll.items():
    out[f"{kind.replace('-', '_')}_bytes_per_device"] = v["bytes"]
  return {f"{name}_{k}": v for k, v in out.items()}
