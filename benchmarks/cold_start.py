"""Cold start: from process start to the first output image, for flashstep, diffusers + peft and torch.compile.

    python benchmarks/cold_start.py [--size 256] [--device cpu] [--skip compile] [--keep DIR]

First writes random-weight checkpoints in the public layouts into a temporary folder (or ``--keep DIR``, reused
when it already holds them): an SD 2.1-base diffusers folder (``unet/``, ``vae/``; full configs), OSEDiff's
``osediff.pkl`` (rank-4 LoRA lists and state dicts as cswry/OSEDiff saves them), a (size/4)² PNG input and the
prompt embedding (the text encoder and the RAM tagger are left out of every variant alike). Then, for each
variant, starts a fresh Python process that imports its libraries, loads the checkpoints, upscales the PNG ×4
(OSEDiff, AdaIN colour fix) and writes the output PNG:

    flashstep        flashstep.load("osediff", base=..., lora=...) and one call
    diffusers        from_pretrained, peft adapters filled from osediff.pkl as OSEDiff_test.load_ckpt does,
                     OSEDiff_test.forward (benchmarks/peers.py)
    torch.compile    the same with the forward compiled (inductor): the first image includes the compilation

The time is from just before the process is started to the moment the child has written its output (the
child reports that instant; process exit is not counted). Each child also reports its stages.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("flashstep", "diffusers", "compile")


# -- the checkpoints -------------------------------------------------------------------------------------
def write_checkpoints(folder: Path, size: int) -> None:
    """SD 2.1-base folder, osediff.pkl, input.png and context.pt under ``folder`` (skipped when present)."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from flashstep import bench
    from flashstep.models.unet import UNet2DCondition
    from flashstep.models.vae import AutoencoderKL

    done = folder / "done.json"
    if done.exists() and json.loads(done.read_text()).get("size") == size:
        return
    folder.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    unet = bench.random_model(lambda: UNet2DCondition(bench.unet_config("full")), device, 1)
    vae = bench.random_model(lambda: AutoencoderKL(bench.vae_config("full")), device, 2)
    for name, model, cls in (("unet", unet, "UNet2DConditionModel"), ("vae", vae, "AutoencoderKL")):
        (folder / "sd21" / name).mkdir(parents=True, exist_ok=True)
        config = dict(model.config.to_diffusers(), _class_name=cls, _diffusers_version="0.25.0")
        (folder / "sd21" / name / "config.json").write_text(json.dumps(config, indent=1))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(folder / "sd21" / name / "diffusion_pytorch_model.safetensors"))
    (folder / "sd21" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"]}))
    torch.save(osediff_checkpoint(unet, vae), folder / "osediff.pkl")
    generator = torch.Generator().manual_seed(0)
    side = size // bench.SCALE
    pixels = (torch.rand(side, side, 3, generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(folder / "input.png")
    torch.save(torch.randn(1, bench.PROMPT_TOKENS, 1024, generator=generator), folder / "context.pt")
    done.write_text(json.dumps({"size": size}))


def osediff_checkpoint(unet, vae) -> dict:
    """osediff.pkl as cswry/OSEDiff's save_model writes it: module lists, ranks, and the LoRA (plus conv_in)
    entries under peft's names."""
    import torch

    from flashstep import bench

    unet_paths, vae_paths = bench.osediff_lora_paths(unet, vae)
    unet_lora = bench.random_lora(unet, unet_paths, bench.OSEDIFF_RANK, 3)
    vae_lora = bench.random_lora(vae, vae_paths, bench.OSEDIFF_RANK, 4)
    groups = {"encoder": [], "decoder": [], "others": []}
    for path in unet_paths:
        if path.startswith("down_blocks") or path == "conv_in":
            groups["encoder"].append(path)
        elif path.startswith("up_blocks") or path == "conv_out":
            groups["decoder"].append(path)
        else:
            groups["others"].append(path)

    def entries(spec, adapter_of):
        out = {}
        for path, weights in spec.modules.items():
            adapter = adapter_of(path)
            conv = weights.down.dim() == 4
            out[f"{path}.lora_A.{adapter}.weight"] = weights.down
            out[f"{path}.lora_B.{adapter}.weight"] = weights.up[:, :, None, None] if conv else weights.up
        return out

    adapter_of_unet = {path: f"default_{group}" for group, paths in groups.items() for path in paths}
    state_unet = entries(unet_lora, adapter_of_unet.__getitem__)
    state_unet["conv_in.base_layer.weight"] = unet.conv_in.weight + 0.05 * torch.randn_like(unet.conv_in.weight)
    state_unet["conv_in.base_layer.bias"] = unet.conv_in.bias + 0.05
    return {
        "unet_lora_encoder_modules": groups["encoder"], "unet_lora_decoder_modules": groups["decoder"],
        "unet_lora_others_modules": groups["others"], "vae_lora_encoder_modules": vae_paths,
        "rank_unet": bench.OSEDIFF_RANK, "rank_vae": bench.OSEDIFF_RANK,
        "state_dict_unet": state_unet, "state_dict_vae": entries(vae_lora, lambda path: "default_encoder"),
    }


# -- the children ----------------------------------------------------------------------------------------
def child(variant: str, folder: Path, size: int, device: str, output: Path) -> None:
    """One cold start, in this (fresh) process; prints a JSON line with the stages' end times."""
    marks = {"start": time.time()}
    import torch
    from PIL import Image

    marks["imported torch"] = time.time()
    context = torch.load(folder / "context.pt", weights_only=True).to(device)
    if variant == "flashstep":
        import flashstep

        marks["imported"] = time.time()
        pipe = flashstep.load("osediff", base=str(folder / "sd21"), lora=str(folder / "osediff.pkl"), device=device,
                              dtype="fp32")
        marks["loaded"] = time.time()
        image = pipe(Image.open(folder / "input.png"), prompt_embeds=context, output_type="pil")
    else:
        sys.path.insert(0, str(HERE))
        import numpy as np

        import peers
        from diffusers import AutoencoderKL, UNet2DConditionModel

        peers.quiet_diffusers()
        marks["imported"] = time.time()
        unet = UNet2DConditionModel.from_pretrained(folder / "sd21", subfolder="unet")
        vae = AutoencoderKL.from_pretrained(folder / "sd21", subfolder="vae")
        load_osediff_ckpt(unet, vae, torch.load(folder / "osediff.pkl", weights_only=True))
        unet, vae = unet.to(device).eval(), vae.to(device).eval()

        def forward(lq):
            return peers.osediff_forward(unet, vae, lq, context, size, torch.float32)

        if variant == "compile":
            forward = torch.compile(forward, dynamic=False)
        marks["loaded"] = time.time()
        pixels = np.asarray(Image.open(folder / "input.png").convert("RGB"), dtype=np.float32) / 255.0
        lq = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device)
        with torch.inference_mode():
            out = forward(lq)[0]
        image = Image.fromarray((out.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    marks["first image"] = time.time()
    image.save(output)
    marks["written"] = time.time()
    print("COLD_START " + json.dumps(marks), flush=True)


def load_osediff_ckpt(unet, vae, checkpoint: dict) -> None:
    """OSEDiff_test.load_ckpt: the three UNet adapters and the VAE's, then every LoRA / conv_in entry copied in."""
    import torch
    from peft import LoraConfig

    rank_unet, rank_vae = checkpoint["rank_unet"], checkpoint["rank_vae"]
    for group in ("encoder", "decoder", "others"):
        unet.add_adapter(LoraConfig(r=rank_unet, init_lora_weights="gaussian",
                                    target_modules=checkpoint[f"unet_lora_{group}_modules"]),
                         adapter_name=f"default_{group}")
    vae.add_adapter(LoraConfig(r=rank_vae, init_lora_weights="gaussian",
                               target_modules=checkpoint["vae_lora_encoder_modules"]), adapter_name="default_encoder")
    with torch.no_grad():
        for model, state in ((unet, checkpoint["state_dict_unet"]), (vae, checkpoint["state_dict_vae"])):
            for name, parameter in model.named_parameters():
                if name in state:
                    parameter.copy_(state[name])
    unet.set_adapter(["default_encoder", "default_decoder", "default_others"])
    vae.set_adapter(["default_encoder"])


# -- the parent ------------------------------------------------------------------------------------------
def run_variant(variant: str, folder: Path, size: int, device: str, threads: int) -> dict:
    output = folder / f"output_{variant}.png"
    output.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--folder", str(folder),
               "--size", str(size), "--device", device, "--output", str(output)]
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    exited = time.time()
    lines = [line for line in done.stdout.splitlines() if line.startswith("COLD_START ")]
    if done.returncode != 0 or not lines or not output.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"variant": variant, "error": f"exit {done.returncode}: " + " | ".join(tail)}
    marks = json.loads(lines[-1][len("COLD_START "):])
    stages = {name: marks[name] - started for name in marks}
    return {"variant": variant, "first_image_s": marks["written"] - started, "exit_s": exited - started,
            "stages_s": stages}


def describe(result: dict) -> str:
    if "error" in result:
        return f"  {result['variant']:<12} failed: {result['error']}"
    stages = result["stages_s"]
    parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items() if name != "start")
    return (f"  {result['variant']:<12} {result['first_image_s']:8.1f} s to the first image written   "
            f"(python up {stages['start']:.1f}; {parts})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="output side (×4 from size/4), default 256")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of the children")
    parser.add_argument("--skip", nargs="*", default=[], choices=VARIANTS, help="variants to leave out")
    parser.add_argument("--keep", help="folder for the checkpoints, kept (and reused) after the run")
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, Path(args.folder), args.size, args.device, Path(args.output))
        return 0
    with tempfile.TemporaryDirectory(prefix="flashstep_cold_") as scratch:
        folder = Path(args.keep) if args.keep else Path(scratch)
        started = time.time()
        write_checkpoints(folder, args.size)
        print(f"checkpoints ready in {folder} ({time.time() - started:.0f} s); OSEDiff {args.size}² output, "
              f"full SD 2.1 config, fp32, {args.device}, {args.threads} threads", flush=True)
        results = []
        for variant in VARIANTS:
            if variant in args.skip:
                continue
            with open("/proc/loadavg") as loadavg:
                load = " ".join(loadavg.read().split()[:3])
            result = run_variant(variant, folder, args.size, args.device, args.threads)
            result["load_average_before"] = load
            results.append(result)
            print(describe(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
