"""Diffusers adapters (every family), latent codecs, media/latent shards, and an in-house backbone.

Each family: a tiny random transformer saved with save_pretrained and loaded through the real
loading code (apt.models.factory); velocity convention checked against the family's own
diffusers scheduler step; readout heads tap visual tokens at chosen depths; gradients flow.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from apt.codecs import LatentCodec, check_codec_fits
from apt.config import ConfigError, load_config
from apt.discriminator import Discriminator
from apt.models import TextCond, tap_hidden_states
from apt.models.adapters import ADAPTERS, family_of_dir, load_adapter_state
from apt.models.adapters.tiny import TEXT_DIM, TINY_PIXELS, write_tiny_family
from apt.models.factory import build_backbone, load_backbone

torch.set_num_threads(1)
FAMILIES = sorted(ADAPTERS)
LATENTS = {"sd3": (4, 1, 8, 8), "flux": (4, 1, 8, 8), "wan": (4, 3, 8, 8), "cogvideox": (4, 3, 8, 8), "ltx": (8, 3, 4, 4), "hunyuan": (4, 3, 8, 8)}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_diffusers")
    return {fam: write_tiny_family(fam, root / fam) for fam in FAMILIES}


def diffusers_config(fam: str, dirs: dict, *extra: str):
    return load_config(None, [], ["model.source=diffusers", f"model.family={fam}", f"model.path={dirs['transformer']}", f"model.vae={dirs['vae']}", *extra])


def text_for(net, B: int = 2, L: int = 5, seed: int = 0) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1:, 3:] = False
    pooled = torch.randn(B, net.config.pooled_dim, generator=g) if net.config.pooled_dim else None
    return TextCond(torch.randn(B, L, net.config.text_dim, generator=g), mask, pooled)


def latents(fam: str, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, *LATENTS[fam], generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- loading, forward, conventions


@pytest.mark.parametrize("fam", FAMILIES)
def test_load_through_factory_and_forward(fam, tiny_dirs):
    c = diffusers_config(fam, tiny_dirs[fam])
    net = build_backbone(c, text_dim=TEXT_DIM)
    assert type(net) is ADAPTERS[fam] and family_of_dir(tiny_dirs[fam]["transformer"]) == fam
    x = latents(fam)
    v = net(x, torch.tensor([1.0, 0.3]), text_for(net))
    assert v.shape == x.shape and torch.isfinite(v).all()
    # the same weights come back from the directory via load_backbone (teacher / D init path)
    again = load_backbone(c, tiny_dirs[fam]["transformer"], "net_ema", text_dim=TEXT_DIM)
    assert torch.equal(again(x, torch.tensor([1.0, 0.3]), text_for(net)), v)


def _pipeline_style_call(fam: str, net, x: torch.Tensor, timestep: torch.Tensor, text: TextCond) -> torch.Tensor:
    """The raw diffusers call each family's pipeline makes (timestep = the scheduler's timestep)."""
    from apt.models.adapters import flux, ltx

    m, B = net.model, x.shape[0]
    emb = text.emb_BLD * text.mask_BL[..., None]
    ts = timestep.expand(B)
    if fam == "sd3":
        return m(hidden_states=x[:, :, 0], encoder_hidden_states=emb, pooled_projections=text.pooled_BP, timestep=ts, return_dict=False)[0].unsqueeze(2)
    if fam == "flux":
        H, W = x.shape[-2:]
        out = m(hidden_states=flux.pack_latents(x[:, :, 0]), encoder_hidden_states=emb, pooled_projections=text.pooled_BP, timestep=ts / 1000,
                img_ids=flux.image_ids(H // 2, W // 2), txt_ids=torch.zeros(emb.shape[1], 3), guidance=torch.full((B,), 3.5), return_dict=False)[0]
        return flux.unpack_latents(out, H, W).unsqueeze(2)
    if fam == "wan":
        return m(hidden_states=x, timestep=ts, encoder_hidden_states=emb, return_dict=False)[0]
    if fam == "ltx":
        _, _, T, H, W = x.shape
        out = m(hidden_states=ltx.pack_latents(x, 1, 1), encoder_hidden_states=text.emb_BLD, timestep=ts, encoder_attention_mask=text.mask_BL.float(),
                num_frames=T, height=H, width=W, rope_interpolation_scale=net.rope_interpolation_scale, return_dict=False)[0]
        return ltx.unpack_latents(out, T, H, W, 1, 1)
    if fam == "hunyuan":
        guidance = torch.full((B,), 6.0 * 1000)
        return m(hidden_states=x, timestep=ts, encoder_hidden_states=text.emb_BLD, encoder_attention_mask=text.mask_BL,
                 pooled_projections=text.pooled_BP, guidance=guidance, return_dict=False)[0]
    raise AssertionError(fam)


@pytest.mark.parametrize("fam", ["sd3", "flux", "wan", "ltx", "hunyuan"])
def test_flow_velocity_matches_flow_match_euler_step(fam, tiny_dirs):
    """apt's Euler step x + (t_next - t) v(x, t) equals diffusers' FlowMatchEulerDiscreteScheduler step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    net = ADAPTERS[fam].from_pretrained(tiny_dirs[fam]["transformer"]).eval()
    x, text = latents(fam), text_for(net)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(3)
    with torch.no_grad():
        for i in range(2):
            t, t_next = sched.sigmas[i], sched.sigmas[i + 1]
            ours = x + (t_next - t) * net(x, t.expand(2), text)
            theirs = sched.step(_pipeline_style_call(fam, net, x, sched.timesteps[i], text), sched.timesteps[i], x).prev_sample
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
            x = theirs


def test_cogvideox_velocity_step_is_a_ddim_step(tiny_dirs):
    """CogVideoX predicts DDPM v; the adapter's rectified-flow Euler step equals CogVideoXDDIMScheduler's step."""
    from diffusers import CogVideoXDDIMScheduler

    from apt.models.adapters.cogvideox import COGVIDEOX_SCHEDULER

    net = ADAPTERS["cogvideox"].from_pretrained(tiny_dirs["cogvideox"]["transformer"]).eval()
    text = text_for(net)
    emb = nn.functional.pad(text.emb_BLD * text.mask_BL[..., None], (0, 0, 0, 32 - text.emb_BLD.shape[1]))
    sched = CogVideoXDDIMScheduler.from_config(COGVIDEOX_SCHEDULER)
    sched.set_timesteps(3)
    x_vp = latents("cogvideox")
    with torch.no_grad():
        for i in range(2):
            k = int(sched.timesteps[i])
            k_next = k - 1000 // 3  # the scheduler's own prev_timestep arithmetic
            v = net.model(hidden_states=x_vp.permute(0, 2, 1, 3, 4), encoder_hidden_states=emb, timestep=torch.tensor([k, k]), return_dict=False)[0]
            theirs = sched.step(v.permute(0, 2, 1, 3, 4), k, x_vp).prev_sample
            t, t_next = net.flow_time(k).float(), net.flow_time(k_next).float()
            s = lambda t: ((1 - t) ** 2 + t**2).sqrt()  # noqa: E731
            x_rf = x_vp * s(t)
            ours = (x_rf + (t_next - t) * net(x_rf, t.expand(2), text)) / s(t_next)
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
            x_vp = theirs


@pytest.mark.parametrize("fam", FAMILIES)
def test_readout_heads_tap_visual_tokens_and_gradients_flow(fam, tiny_dirs):
    net = ADAPTERS[fam].from_pretrained(tiny_dirs[fam]["transformer"])
    x, text = latents(fam), text_for(net)
    _, _, T, H, W = x.shape
    pt, ph, pw = net.config.patch_size
    N = (T // pt) * (H // ph) * (W // pw)
    depth = len(net.blocks)
    assert depth == 2 and all(isinstance(b, nn.Module) for b in net.blocks)
    assert not any(k.startswith("blocks") for k in net.state_dict())  # the view is not registered
    with tap_hidden_states(net, list(range(depth))) as hidden:
        net(x, torch.tensor([0.5, 0.9]), text)
    assert {i: tuple(h.shape) for i, h in hidden.items()} == {i: (2, N, net.hidden_dim) for i in range(depth)}
    D = Discriminator(net, fractions=[0.5, 1.0], num_heads=net.config.num_heads)
    logits = D(x, D.sample_t(2), text)
    assert logits.shape == (2,)
    logits.sum().backward()
    assert all(p.grad is not None for p in D.heads.parameters())
    assert sum(float(p.grad.abs().sum()) for p in net.blocks[0].parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("fam", ["wan", "flux"])
def test_apt_checkpoint_weights_load_in_either_key_form(fam, tiny_dirs, tmp_path):
    from safetensors.torch import save_file

    c = diffusers_config(fam, tiny_dirs[fam])
    net = build_backbone(c, text_dim=TEXT_DIM)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "generator_ema.safetensors"))
    loaded = load_backbone(c, str(tmp_path), "generator_ema", text_dim=TEXT_DIM)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    bare = build_backbone(c, text_dim=TEXT_DIM)
    load_adapter_state(bare, net.model.state_dict())  # diffusers keys, no "model." prefix
    assert all(torch.equal(a, b) for a, b in zip(bare.state_dict().values(), net.state_dict().values()))
    with pytest.raises(FileNotFoundError):
        load_backbone(c, str(tmp_path), "net_ema", text_dim=TEXT_DIM)


# ---------------------------------------------------------------- errors name the mismatch


def test_not_a_diffusers_dir_names_the_directory(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}.*no config.json"):
        ADAPTERS["wan"].from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a SD3Transformer2DModel model, not a WanTransformer3DModel"):
        ADAPTERS["wan"].from_pretrained(tiny_dirs["sd3"]["transformer"])
    with pytest.raises(ConfigError, match="model.family 'sdxl' unknown"):
        load_config(None, [], ["model.source=diffusers", "model.family=sdxl", "model.path=x"])
    with pytest.raises(ConfigError, match="model.source must be one of builtin, diffusers, python"):
        load_config(None, [], ["model.source=hub"])
    c = diffusers_config("wan", tiny_dirs["wan"])
    with pytest.raises(ConfigError, match="gives 32-wide embeddings but the WanTransformer3DModel .* expects 64"):
        build_backbone(c, text_dim=32)


def test_sequence_parallel_checks_the_heads_of_model_path_before_training(tiny_dirs, toy_shards):
    from apt.train import check_paths

    net = tiny_dirs["wan"]["transformer"]
    c = diffusers_config("wan", tiny_dirs["wan"], "stage=apt", f"apt.generator={net}", f"apt.teacher={net}", f"data.shards={toy_shards['video']}",
                         "train.strategy=ddp", "train.devices=4", "train.sequence_parallel=4")
    with pytest.raises(ConfigError, match="train.sequence_parallel=4: .* the 2 heads of model.path .* do not divide 4 ranks"):
        check_paths(c)


def test_sequence_parallel_checks_the_latent_token_count_before_training(tiny_dirs, toy_shards, tmp_path):
    """diffusers' split does not pad: 1x6x6 latents (9 tokens for Wan's 1x2x2 patch) cannot go over 2 ranks."""
    import io
    import tarfile

    from apt.train import check_sequence_split

    shards = tmp_path / "lat"
    shards.mkdir()
    raw = io.BytesIO()
    np.save(raw, np.zeros((4, 1, 6, 6), dtype=np.float32))
    with tarfile.open(shards / "latents-000000.tar", "w") as tar:
        info = tarfile.TarInfo("000000.latent.npy")
        info.size = len(raw.getvalue())
        tar.addfile(info, io.BytesIO(raw.getvalue()))
    net = tiny_dirs["wan"]["transformer"]
    base = ["stage=apt", f"apt.generator={net}", f"apt.teacher={net}", "train.strategy=ddp", "train.devices=2", "train.sequence_parallel=2"]
    c = diffusers_config("wan", tiny_dirs["wan"], *base, f"data.shards={shards}")
    with pytest.raises(ConfigError, match=r"train.sequence_parallel=2: the latents of data.shards .* are 1x6x6 .* 9 visual tokens for patch 1x2x2"):
        check_sequence_split(c, [1, 2, 2])
    check_sequence_split(diffusers_config("wan", tiny_dirs["wan"], *base, f"data.shards={toy_shards['video']}"), [1, 2, 2])  # pixel shards: at the first forward


def test_codec_geometry_errors(tiny_dirs):
    wan = ADAPTERS["wan"].from_pretrained(tiny_dirs["wan"]["transformer"])
    wan_vae, ltx_vae = LatentCodec.load(tiny_dirs["wan"]["vae"]), LatentCodec.load(tiny_dirs["ltx"]["vae"])
    check_codec_fits(wan_vae, wan, num_frames=49, height=720, width=1280)
    with pytest.raises(ValueError, match="VAE .* has 8 latent channels but the transformer WanTransformer3DModel expects in_channels=4"):
        check_codec_fits(ltx_vae, wan, num_frames=49, height=32, width=32)
    with pytest.raises(ValueError, match="48 frames does not fit the AutoencoderKLWan \\(temporal stride 4\\): use 4k\\+1 frames, e.g. 45 or 49"):
        check_codec_fits(wan_vae, wan, num_frames=48, height=32, width=32)
    with pytest.raises(ValueError, match="resolution 40x32 is not divisible by VAE factor x patch size .* \\(= 16x16\\)"):
        check_codec_fits(wan_vae, wan, num_frames=5, height=40, width=32)
    with pytest.raises(ValueError, match="latent resolution 5x8 is not divisible by the WanTransformer3DModel patch size 2x2"):
        wan(torch.randn(1, 4, 1, 5, 8), torch.ones(1), text_for(wan, B=1))
    with pytest.raises(ValueError, match="latents have 3 channels but the WanTransformer3DModel expects 4"):
        wan(torch.randn(1, 3, 1, 8, 8), torch.ones(1), text_for(wan, B=1))
    sd3 = ADAPTERS["sd3"].from_pretrained(tiny_dirs["sd3"]["transformer"])
    with pytest.raises(ValueError, match="image model: latents must have T=1"):
        sd3(torch.randn(1, 4, 2, 8, 8), torch.ones(1), text_for(sd3, B=1))


@pytest.mark.parametrize("fam", FAMILIES)
def test_codec_roundtrip_shapes_and_normalisation(fam, tiny_dirs):
    codec = LatentCodec.load(tiny_dirs[fam]["vae"])
    net = ADAPTERS[fam].from_pretrained(tiny_dirs[fam]["transformer"])
    T, H, W = TINY_PIXELS[fam]
    check_codec_fits(codec, net, num_frames=T, height=H, width=W)
    pixels = torch.rand(1, 3, T, H, W) * 2 - 1
    z = codec.encode(pixels)
    assert z.shape == (1, codec.latent_channels, codec.latent_frames(T), H // codec.spatial_factor, W // codec.spatial_factor)
    torch.testing.assert_close(codec.denormalize(codec.normalize(z)), z, rtol=1e-5, atol=1e-5)
    assert codec.decode(z).shape == pixels.shape


# ---------------------------------------------------------------- an in-house backbone


class InHouseBackbone(nn.Module):
    """What a user writes for their own model (docs/byo_model.md): the four protocol members."""

    def __init__(self, channels: int = 4, dim: int = 32, text_dim: int = 16, depth: int = 3):
        super().__init__()
        self.hidden_dim = dim
        self.config = type("Cfg", (), {"num_heads": 4, "prediction": "velocity"})()
        self.embed = nn.Linear(channels, dim)
        self.text = nn.Linear(text_dim, dim)
        self.time = nn.Linear(1, dim)
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(dim, 4, 2 * dim, batch_first=True) for _ in range(depth)])
        self.out = nn.Linear(dim, channels)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    def visual_tokens(self, block_output: torch.Tensor) -> torch.Tensor:
        return block_output[:, self._num_text:]  # text tokens first in the joint sequence

    def forward(self, x_BCTHW, t_B, text: TextCond):
        B, C, T, H, W = x_BCTHW.shape
        h = self.embed(x_BCTHW.flatten(2).transpose(1, 2)) + self.time(t_B.view(B, 1, 1).to(x_BCTHW.dtype))
        c = self.text(text.emb_BLD)
        self._num_text = c.shape[1]
        s = torch.cat([c, h], 1)
        pad = torch.cat([~text.mask_BL, torch.zeros(B, h.shape[1], dtype=torch.bool)], 1)
        for layer in self.layers:
            s = layer(s, src_key_padding_mask=pad)
        return self.out(s[:, self._num_text:]).transpose(1, 2).reshape(B, C, T, H, W)


def test_in_house_backbone_works_with_the_discriminator_and_sampler():
    from apt.flow import euler_sample
    from apt.models.backbone import Backbone

    torch.manual_seed(0)
    net = InHouseBackbone()
    assert isinstance(net, Backbone)
    x = torch.randn(2, 4, 2, 4, 4)
    text = TextCond(torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool))
    D = Discriminator(net, fractions=[0.5, 1.0], num_heads=net.config.num_heads)
    with tap_hidden_states(net, D.layers) as hidden:
        net(x, torch.ones(2), text)
    assert all(h.shape == (2, 32, 32) for h in hidden.values())
    D(x, D.sample_t(2), text).sum().backward()
    assert net.layers[0].linear1.weight.grad is not None
    assert euler_sample(net, x, text, steps=1).shape == x.shape


# ---------------------------------------------------------------- media and latent shards


def write_mp4(path: str, frames: int, fps: int = 12, size: tuple[int, int] = (48, 64)) -> None:
    import av

    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((*size, 3), (i * 20) % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    for i in range(3):
        write_mp4(str(d / f"clip{i}.mp4"), frames=24)
        (d / f"clip{i}.txt").write_text(f"a gray clip number {i}")
    write_mp4(str(d / "short.mp4"), frames=3)
    (d / "short.txt").write_text("too short")
    (d / "broken.mp4").write_bytes(b"not a video at all")
    (d / "broken.txt").write_text("broken")
    write_mp4(str(d / "nocaption.mp4"), frames=24)
    from PIL import Image

    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(d / "still.png")
    (d / "still.txt").write_text("a black image")
    return d


def test_media_shards_policy_and_report(media_dir, tmp_path):
    from apt.data.media_shards import MediaPolicy, write_media_shards
    from apt.data.shards import eval_loader

    report = write_media_shards(media_dir, tmp_path / "s", MediaPolicy(frames=5, fps=6, height=16, width=24), samples_per_shard=2, progress=False)
    assert report["written"] == 3 and len(report["shards"]) == 2
    reasons = {os.path.basename(s["path"]): s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"short.mp4", "broken.mp4", "nocaption.mp4", "still.png"}
    assert reasons["short.mp4"].startswith("too short") and reasons["broken.mp4"].startswith("undecodable")
    assert reasons["nocaption.mp4"] == "no caption" and "image, but clips need 5 frames" in reasons["still.png"]
    assert json.loads((tmp_path / "s" / "report.json").read_text())["num_skipped"] == 4
    batch = next(iter(eval_loader(str(tmp_path / "s"), batch_size=3)))
    assert batch["x"].shape == (3, 3, 5, 16, 24)
    # 6 fps from a 12 fps source takes every other frame: gray levels 0, 40, 80, ... (x264 is lossy)
    levels = ((batch["x"][0, 0, :, 8, 12] + 1) * 127.5).tolist()
    assert np.allclose(levels, [0, 40, 80, 120, 160], atol=6)


def test_latent_shards_encode_resume_and_load(media_dir, tiny_dirs, tmp_path):
    from apt.data.latent_shards import encode_latent_shards, is_latent_shards, latent_train_loader
    from apt.data.media_shards import MediaPolicy, write_media_shards
    from apt.data.shards import resolve_shards
    from apt.text import TextEncoder

    write_media_shards(media_dir, tmp_path / "px", MediaPolicy(frames=5, fps=6, height=32, width=32), samples_per_shard=1, progress=False)
    codec, te = LatentCodec.load(tiny_dirs["wan"]["vae"]), TextEncoder.load("toy-t5")
    out = str(tmp_path / "lat")
    r1 = encode_latent_shards(str(tmp_path / "px"), out, codec, te, rank=1, world_size=2, progress=False)
    assert r1 == {"rank": 1, "world_size": 2, "shards": 1, "skipped_existing": 0, "samples_written": 1, "complete": False}
    r0 = encode_latent_shards(str(tmp_path / "px"), out, codec, te, rank=0, world_size=1, progress=False)
    assert r0["skipped_existing"] == 1 and r0["samples_written"] == 2 and r0["complete"]
    urls = resolve_shards(out)
    assert is_latent_shards(urls) and not is_latent_shards(resolve_shards(str(tmp_path / "px")))
    full = latent_train_loader(out, batch_size=2, seed=3, shuffle_buffer=4)
    batches = [b for _, b in zip(range(3), full)]
    assert batches[0]["x"].shape == (2, 4, 2, 4, 4) and batches[0]["text_emb"].shape[-1] == TEXT_DIM
    assert batches[0]["text_mask"].dtype == torch.bool and len(batches[0]["caption"]) == 2
    resumed = next(iter(latent_train_loader(out, batch_size=2, seed=3, shuffle_buffer=4, skip_batches=2)))
    assert torch.equal(resumed["x"], batches[2]["x"]) and resumed["key"] == batches[2]["key"]
    # the stored text is what the encoder gives for the caption
    one = te.encode([batches[0]["caption"][0]])
    L = int(batches[0]["text_mask"][0].sum())
    torch.testing.assert_close(batches[0]["text_emb"][0, :L], one.emb_BLD[0, :L])


@pytest.mark.parametrize("fam", FAMILIES)
def test_empty_prompt_gives_finite_velocity(fam, tiny_dirs):
    """The CFG null text (no valid token, as TextEncoder encodes '') must not produce NaN."""
    net = ADAPTERS[fam].from_pretrained(tiny_dirs[fam]["transformer"])
    text = text_for(net)
    null = TextCond(torch.zeros_like(text.emb_BLD[:, :1]), torch.zeros(2, 1, dtype=torch.bool), text.pooled_BP)
    assert torch.isfinite(net(latents(fam), torch.tensor([1.0, 0.5]), null)).all()
