"""Times one text-to-image generation with diffusers, stage by stage, as sd-run's
`bench_pipeline` example does: model load, text encode (prompt and negative prompt), the
denoising loop (UNet with classifier-free guidance + DDIM step), VAE decode. Prints one JSON line.
Usage: diffusers_run.py MODEL_DIR WIDTH HEIGHT STEPS THREADS [IMAGE_OUT.f32]
"""

import json
import sys
import time

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

PROMPT = "a photograph of an astronaut riding a horse, detailed, 4k"
NEGATIVE = "blurry, low quality"
GUIDANCE = 7.5
SEED = 0


def main():
    model, width, height, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    out = sys.argv[6] if len(sys.argv) > 6 else None
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False, dtype=torch.float32)
    # diffusers maps the safetensors lazily: touch every weight so that the load is whole here
    # (as sd-run's is) and not paid inside the first text encode and UNet step.
    with torch.inference_mode():
        for module in (pipe.text_encoder, pipe.unet, pipe.vae):
            for p in module.parameters():
                p.sum()
    load = time.perf_counter() - t0
    with torch.inference_mode():
        t0 = time.perf_counter()
        pos, neg = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        text = time.perf_counter() - t0

        t0 = time.perf_counter()
        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(steps)
        gen = torch.Generator("cpu").manual_seed(SEED)
        latents = torch.randn((1, pipe.unet.config.in_channels, height // 8, width // 8), generator=gen) * sched.init_noise_sigma
        context = torch.cat([neg, pos])
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents, latents]), t)
            eps = pipe.unet(inp, t, encoder_hidden_states=context).sample
            uncond, cond = eps.chunk(2)
            eps = uncond + GUIDANCE * (cond - uncond)
            latents = sched.step(eps, t, latents).prev_sample
        denoise = time.perf_counter() - t0

        t0 = time.perf_counter()
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().contiguous()
        decode = time.perf_counter() - t0
    if out:
        image.numpy().tofile(out)
    print(json.dumps({
        "load": load,
        "text": text,
        "unet_step": denoise / steps,
        "decode": decode,
        "image": text + denoise + decode,
    }))


if __name__ == "__main__":
    main()
