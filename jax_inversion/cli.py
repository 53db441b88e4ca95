"""``jax-inversion <command> [--flags]``: one absl program per command.

Each command lives in ``jax_inversion.commands.<name>`` with its own absl flags and
``main(argv)``; only the chosen one is imported, so flag names never collide.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
from typing import Optional

COMMANDS = {
    "train": ("train", "learn placeholder token embeddings from a folder of images"),
    "export": ("export", "write a run's embeddings for diffusers, A1111/ComfyUI, SDXL, or the extended format"),
    "sample": ("sample", "draw images of prompts with learned tokens (layout guidance optional)"),
    "attention": ("attention", "draw each prompt token's cross-attention map over a generated image"),
    "train-layout": ("train_layout", "learn where two words' objects go (boxes) for Compositional Inversion sampling"),
    "compile": ("compile", "compile the train step for a TPU topology without a TPU: memory per chip, FLOPs, kernels"),
    "check-parity": ("check_parity", "compare our Flax models with PyTorch diffusers/transformers on a model"),
    "toyworld": ("toyworld", "the offline toy world: pretrain its model, write its concepts, evaluate a run"),
}


CONFIG_HELP = (
    "Config keys: every field of the --config file can be set as --config.<key>=value; the fields and their\n"
    "defaults are in jax_inversion/configs/ (ti.py: data, train, loss; lego.py, compositional.py, sefi.py add theirs),\n"
    "for toyworld pretrain in jax_inversion/toyworld/config.py."
)
HELP_FLAGS = ("-h", "--help", "-help", "--h")
GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")  # NVIDIA, WSL2, ROCm
GOOGLE_PCI_VENDOR = "0x1ae0"  # a TPU chip's PCI vendor id (jax's own test: hardware_utils)


def cpu_where_libtpu_has_no_chip(environ=os.environ, pci_devices: str = "/sys/bus/pci/devices",
                                 gpu_device_files=GPU_DEVICE_FILES) -> bool:
    """Sets ``JAX_PLATFORMS=cpu`` when libtpu is installed (the ``tpu`` and ``test`` extras) on a machine with
    no TPU chip and no GPU, and ``JAX_PLATFORMS`` is not set; returns whether it did.

    Without it jax starts libtpu in every command, and on such a machine libtpu prints four lines of errors
    (TPU worker hostnames, accelerator type) before jax falls back to the CPU, where it runs anyway. A TPU
    chip (Google's PCI vendor id), a GPU device file or the user's own ``JAX_PLATFORMS`` leaves it all alone.
    """
    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
        return False
    if any(os.path.exists(path) for path in gpu_device_files):
        return False
    for vendor in glob.glob(os.path.join(pci_devices, "*", "vendor")):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return False
        except OSError:
            continue
    environ["JAX_PLATFORMS"] = "cpu"
    return True


def usage() -> str:
    lines = ["usage: jax-inversion <command> [--flags]   (jax-inversion <command> --help for its flags)", ""]
    lines += [f"  {name:14s} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def command_help(name: str, module) -> str:
    """A command's purpose, its docstring (usage lines), its own flags, and where the config keys are."""
    from absl import flags

    lines = [f"jax-inversion {name}: {COMMANDS[name][1]}", ""]
    doc = (module.__doc__ or "").strip()
    if doc:
        lines += [doc, ""]
    lines.append("flags:")
    for defining in sorted(flags.FLAGS.flags_by_module_dict()):  # only this command's modules are imported
        if defining.startswith("jax_inversion.commands."):
            lines += flags.FLAGS.module_help(defining).strip().splitlines()[1:]  # without the module-name header
    if "config" in flags.FLAGS:
        lines += ["", CONFIG_HELP]
    lines += ["", f"(jax-inversion {name} --helpfull also lists absl's own flags)"]
    return "\n".join(lines)


def unknown_config_key(error: BaseException) -> Optional[str]:
    """The path of a ``--config.<path>=value`` override the config lacks (``train.not_a_key``) when
    ``error`` is ml_collections refusing it, else None.

    ml_collections' config flag looks each override up while the flag is defined (the command's
    import), in ``ml_collections.config_flags.config_path``: AttributeError (a ConfigDict key),
    KeyError or IndexError (inside another value) from its ``get_type``, ValueError from its
    ``initialize_missing_parent_fields`` (a path under a field that is None, ``data.templates.x``).
    Only an error raised through that module is the override's; the same types raised anywhere
    else in an import are not.
    """
    if not isinstance(error, (AttributeError, KeyError, IndexError, ValueError)):
        return None
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals.get("__name__") == "ml_collections.config_flags.config_path":
            path = frame.f_locals.get("config_path", frame.f_locals.get("override"))
            return path if isinstance(path, str) else str(error).strip("\"'")
        tb = tb.tb_next
    return None


def run(argv=None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in COMMANDS:
        print(f"jax-inversion: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    cpu_where_libtpu_has_no_chip()  # before the command imports jax
    from absl import app, flags

    program_argv = [f"jax-inversion {name}"] + argv[2:]
    saved_argv, sys.argv = sys.argv, program_argv  # config flags read overrides while being defined
    try:
        module = importlib.import_module(f"jax_inversion.commands.{COMMANDS[name][0]}")
    except (AttributeError, KeyError, IndexError, ValueError) as e:
        key = unknown_config_key(e)
        if key is None:  # raised by the command's own code: a bug, with its traceback
            raise
        sys.exit(f"{name}: unknown config key {key!r} in the --config.* flags: see jax_inversion/configs/ for the keys")
    finally:
        sys.argv = saved_argv
    if any(arg in HELP_FLAGS for arg in argv[2:]):
        print(command_help(name, module))
        sys.exit(0)

    def parse_flags(args):
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            if "Traceback (most recent call last):" in lines:  # an error raised inside a config file
                sys.exit(f"{name}: {lines[0].rstrip(':')}: {lines[-1]}")
            sys.exit(f"{name}: {e} (jax-inversion {name} --helpfull lists the flags)")

    def main(args):
        from absl import logging

        logging.set_verbosity(logging.WARNING)  # library INFO chatter (Orbax, XLA) hides our output
        module.main(args)

    app.run(main, argv=program_argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
