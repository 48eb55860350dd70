"""Vision-based distillation judged by ComfyUI's own UNet: the MODEL of the graph, with
whatever the graph patched into it (LoRAs, FreeU, ...). The library's training run plans each
trajectory (captions, starting noise, guidance, the denoising step it trains) and holds the
student; this file walks the trajectory with the MODEL in torch, as ComfyUI samples: its
model sampling (eps or v-prediction), its sigmas for the chosen scheduler, Euler steps with
classifier-free guidance (the empty prompt's CLIP conditioning as the unconditional branch).
At each step the loss is the per-sample mean squared difference of the UNet's predictions
under the teacher's and the student's conditioning, and its gradient with respect to the
student's conditioning (the UNet frozen, no weight gradients) goes back to the library.
"""

from __future__ import annotations

import math

import torch

# What an SDXL UNet takes: CLIP-L + CLIP-G context, CLIP-G pooled + six size embeddings.
SDXL_CONTEXT = 2048
SDXL_ADM = 2816


def check_sdxl(model) -> None:
    """One clear error for a MODEL that is not an SDXL UNet (SD1.5, SD3, Flux, ...)."""
    import comfy.model_base

    base = getattr(model, "model", None)
    unet = getattr(getattr(base, "model_config", None), "unet_config", {}) or {}
    ok = (
        isinstance(base, comfy.model_base.SDXL)
        and unet.get("context_dim") == SDXL_CONTEXT
        and unet.get("adm_in_channels") == SDXL_ADM
    )
    if not ok:
        kind = type(base).__name__ if base is not None else type(model).__name__
        raise ValueError(
            f"qwenclip: the vision objective needs the MODEL of an SDXL checkpoint (context "
            f"{SDXL_CONTEXT}, pooled + size ids {SDXL_ADM}); this MODEL is {kind} with context "
            f"{unet.get('context_dim')} and {unet.get('adm_in_channels')}. Connect the MODEL "
            "output of the SDXL checkpoint whose CLIP is the teacher."
        )


def raw_prediction(model_sampling, sigma: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor):
    """What the UNet itself predicted (noise, or v), from ComfyUI's denoised output: the
    vision loss compares these, as the library's judge does."""
    import comfy.model_sampling as ms

    s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
    if isinstance(model_sampling, ms.V_PREDICTION) and not isinstance(model_sampling, ms.EDM):
        sd = model_sampling.sigma_data
        total = s**2 + sd**2
        return (x * sd**2 / total - denoised) * total.sqrt() / (s * sd)
    if isinstance(model_sampling, ms.EPS) and not isinstance(model_sampling, (ms.V_PREDICTION, ms.X0)):
        return (x - denoised) / s
    raise ValueError(
        f"qwenclip: the vision objective supports eps- and v-prediction SDXL models; this "
        f"MODEL samples with {type(model_sampling).__name__}"
    )


def _differentiable(module: torch.nn.Module) -> None:
    """Weights ComfyUI created under inference mode cannot be saved for backward (needed for
    the gradient with respect to the conditioning): replace those by normal copies, once."""
    import comfy.utils

    for name, p in list(module.named_parameters()):
        if p.is_inference():
            comfy.utils.set_attr_param(module, name, p.detach().clone())


class ComfyJudge:
    """The graph's MODEL as the judge of a run's trajectories."""

    def __init__(self, model, scheduler: str):
        check_sdxl(model)
        self.model = model
        self.scheduler = scheduler
        self.sampling = model.get_model_object("model_sampling")
        # The latents of the trajectory in progress: (seed, step, tensor).
        self.latents: tuple[int, int, torch.Tensor] | None = None

    def load(self) -> None:
        """Loads the UNet where ComfyUI's model management wants it (as loaded: fp16/bf16/fp32)."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.model])
        _differentiable(self.model.model.diffusion_model)
        self.device = self.model.load_device

    def sigmas(self, steps: int) -> torch.Tensor:
        import comfy.samplers

        s = comfy.samplers.calculate_sigmas(self.sampling, self.scheduler, steps)
        return s.to(self.device, torch.float32)

    def denoised(self, x, sigma, embeds, pooled, size: int) -> torch.Tensor:
        base = self.model.model
        n = x.shape[0]
        y = base.encode_adm(
            pooled_output=pooled,
            width=size,
            height=size,
            crop_w=0,
            crop_h=0,
            target_width=size,
            target_height=size,
        )
        options = dict(self.model.model_options.get("transformer_options", {}))
        options["sigmas"] = sigma.expand(n)
        return base.apply_model(
            x, sigma.expand(n), c_crossattn=embeds, y=y.to(x.device), transformer_options=options
        )

    def start(self, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The first latents, scaled as ComfyUI's KSampler scales full-denoise noise."""
        first = sigmas[0]
        max_denoise = bool(first >= float(self.sampling.sigma_max) * (1 - 1e-5))
        return self.sampling.noise_scaling(first, noise, torch.zeros_like(noise), max_denoise)

    def teacher_step(self, x, k, sigmas, teacher, uncond, guidance, size):
        """The teacher's prediction at step k and the latents after the guided Euler step."""
        sigma = sigmas[k]
        with torch.no_grad():
            cond = self.denoised(x, sigma, *teacher, size)
            n = x.shape[0]
            free = self.denoised(x, sigma, uncond[0].expand(n, -1, -1), uncond[1].expand(n, -1), size)
            g = guidance.reshape(-1, 1, 1, 1)
            guided = free + g * (cond - free)
            d = (x - guided) / sigma
            nxt = x + d * (sigmas[k + 1] - sigma)
        return raw_prediction(self.sampling, sigma, x, cond).detach(), nxt.detach()

    def step(self, trajectory: dict, noise, teacher, uncond, student):
        """One denoising step of `trajectory` (the run's): returns the vision loss and its
        gradient with respect to `student` (embeds, pooled). Tensors on any device."""
        dev = self.device
        teacher = tuple(t.to(dev, torch.float32) for t in teacher)
        uncond = tuple(t.to(dev, torch.float32) for t in uncond)
        guidance = torch.tensor(trajectory["guidance"], dtype=torch.float32, device=dev)
        size, k, seed = trajectory["resolution"], trajectory["step"], trajectory["seed"]
        sigmas = self.sigmas(trajectory["denoise_steps"])
        if self.latents is not None and self.latents[:2] == (seed, k):
            x = self.latents[2]
        else:  # a new trajectory, or a resumed one: the teacher's steps again, from the noise
            x = self.start(noise.to(dev, torch.float32), sigmas)
            for j in range(k):
                x = self.teacher_step(x, j, sigmas, teacher, uncond, guidance, size)[1]
        want, nxt = self.teacher_step(x, k, sigmas, teacher, uncond, guidance, size)
        e, p = (t.to(dev, torch.float32).requires_grad_(True) for t in student)
        got = raw_prediction(self.sampling, sigmas[k], x, self.denoised(x, sigmas[k], e, p, size))
        loss = (got.float() - want.float()).pow(2).flatten(1).mean(1).mean()
        ge, gp = torch.autograd.grad(loss, (e, p))
        self.latents = (seed, k + 1, nxt)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"qwenclip: the vision loss is {value} at denoising step {k}")
        return value, ge.to("cpu", torch.float32).contiguous(), gp.to("cpu", torch.float32).contiguous()
