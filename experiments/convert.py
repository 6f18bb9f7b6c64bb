"""Convert a TD-MPC2 checkpoint (official .pt of any era, or ours) to an Orbax dir or an official .pt.

  python experiments/convert.py --input=model.pt --output=ckpt_dir
  python experiments/convert.py --input=model.pt --summary
  python experiments/convert.py --input=ckpt_dir --output=model.pt --export_format=new
"""
import json
import os

from absl import flags

import tdmpc_jax
from tdmpc_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "official .pt file or tdmpc_jax Orbax directory", required=True)
flags.DEFINE_string("output", None, "Orbax directory to write (or a .pt path with --export_format)")
flags.DEFINE_bool("summary", False, "print the inferred architecture and parameter counts")
flags.DEFINE_enum("export_format", None, ["old", "new"], "write an official PyTorch state dict instead")
flags.DEFINE_string("task_set", None, "override the inferred task set (mt30 / mt80)")
cli.existing_path("input")
cli.task_set_name("task_set")
cli.output("output", lambda v: "torch-file" if v["export_format"] else "checkpoint", depends=("export_format",))


def _check_request(v):
    if v["output"] is None and not v["summary"]:
        raise ValueError("nothing to do: give --output and/or --summary")
    if v["output"] is not None and not v["export_format"] and v["output"].lower().endswith(".pt"):
        raise ValueError(f"--output={v['output']}: names a .pt file but writes an Orbax directory; "
                         "pass --export_format=old|new for a PyTorch file")
    if v["export_format"] and v["output"] is None:
        raise ValueError("--export_format: needs --output")


cli.check(("output", "summary", "export_format"), _check_request)


def summary(agent) -> str:
    c, n = agent.config, agent.num_params()
    lines = [f"checkpoint: {agent.metadata.get('source')}",
             f"model_size: {c.model_size}  task_set: {c.task_set}  tasks: {c.num_tasks}",
             f"obs_dim {c.obs_dim}  action_dim {c.action_dim}  latent {c.latent_dim}  enc {c.enc_dim} x "
             f"{c.num_enc_layers} layers  mlp {c.mlp_dim}  task_dim {c.task_dim}  num_q {c.num_q}",
             "parameters:"]
    lines += [f"  {k:12s} {v:>14,d}" for k, v in n.items() if k not in ("learnable", "target")]
    lines += [f"  {'learnable':12s} {n['learnable']:>14,d}", f"  {'target Qs':12s} {n['target']:>14,d}",
              f"  {'total':12s} {n['learnable'] + n['target']:>14,d}"]
    return "\n".join(lines)


def main(argv):
    del argv
    overrides = {"task_set": FLAGS.task_set} if FLAGS.task_set else {}
    agent = tdmpc_jax.load_checkpoint(FLAGS.input, **overrides)
    if FLAGS.summary:
        print(summary(agent))
    if FLAGS.output is None:
        return
    from tdmpc_jax.results_io import check_output
    out = check_output(FLAGS.output, "torch-file" if FLAGS.export_format else "checkpoint", FLAGS.overwrite)
    if FLAGS.export_format:
        from tdmpc_jax.checkpoints import official
        from tdmpc_jax.checkpoints.torch_writer import write_torch_file
        sd = official.params_to_state_dict(agent.params, agent.target_qs, agent.config, FLAGS.export_format)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        write_torch_file(out, {"model": sd})  # temp sibling, then rename
    else:
        agent.save(out)  # temp sibling, then rename
    print(json.dumps({"wrote": FLAGS.output, "params": agent.num_params()["learnable"]}))


if __name__ == "__main__":
    cli.run(main)
