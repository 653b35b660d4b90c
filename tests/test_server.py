"""`sdcli serve` (sdcli.server, server_jobs, server_models, server_queue): a real server on a loopback port, a real
HTTP client (httpx), the tiny checkpoint in fp32.

The images must be the very bytes the CLI writes for the same settings: the server runs the CLI's own jobs.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SD1, run_cli
from PIL import Image

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from sdcli.memory_check import estimate  # noqa: E402
from sdcli.server import create_app  # noqa: E402
from sdcli.server_jobs import Service, Settings  # noqa: E402

SMALL = {"width": 64, "height": 64, "steps": 2}
CLI_SMALL = ("-W", 64, "-H", 64, "--steps", 2, "--device", "cpu", "--dtype", "fp32", "--quiet", "--json")


@contextlib.contextmanager
def running(service: Service, **options):
    """Serve `service` on a free loopback port in a thread; yields an httpx client for it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service, **options), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join()
        service.queue.close()
        sock.close()


def make_service(checkpoint: str, weights: Path, **settings) -> Service:
    defaults = dict(device=torch.device("cpu"), dtype=torch.float32, queue=2, max_body=300_000)
    service = Service(Settings(model=Path(checkpoint), weights_dir=weights, **{**defaults, **settings}))
    service.load()
    return service


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    """(client, service) of a server without authentication."""
    service = make_service(tiny_checkpoint, tmp_path_factory.mktemp("served-weights"))
    with running(service) as client:
        yield client, service


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def images_of(response) -> list[bytes]:
    assert response.status_code == 200, response.text
    return [base64.b64decode(image) for image in response.json()["images"]]


def cli_images(*args) -> list[bytes]:
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    return [Path(json.loads(line)["path"]).read_bytes() for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def init_and_mask(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "init.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:40, 20:52] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder / "init.png", folder / "mask.png"


def test_txt2img_images_are_the_cli_bytes_with_seeds_counting_up(served, tiny_checkpoint, tmp_path):
    client, _ = served
    payload = {"prompt": "a cat", "negative_prompt": "dog", "seed": 7, "n_iter": 2, "batch_size": 1, **SMALL,
               "sampler_name": "Euler a", "cfg_scale": 6.5}  # fmt: skip
    response = client.post("/sdapi/v1/txt2img", json=payload)
    served_images = images_of(response)
    cli = cli_images("txt2img", "a cat", "-n", "dog", "--seed", 7, "--n", 2, "--sampler", "Euler a", "--cfg", 6.5,
                     "--model", tiny_checkpoint, "--outdir", tmp_path, *CLI_SMALL)  # fmt: skip
    assert served_images == cli
    info = json.loads(response.json()["info"])
    assert (info["seed"], info["all_seeds"]) == (7, [7, 8])
    assert info["infotexts"][1] == Image.open(io.BytesIO(cli[1])).info["parameters"]
    assert "Seed: 8" in info["infotexts"][1]
    assert response.json()["parameters"]["prompt"] == "a cat"


def test_scheduler_and_clip_skip_override_match_the_cli_sampler_name(served, tiny_checkpoint, tmp_path):
    client, _ = served
    payload = {"prompt": "a cat", "seed": 3, **SMALL, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
               "override_settings": {"CLIP_stop_at_last_layers": 2}}  # fmt: skip
    cli = cli_images("txt2img", "a cat", "--seed", 3, "--sampler", "dpmpp_2m_karras", "--clip-skip", 2,
                     "--model", tiny_checkpoint, "--outdir", tmp_path, *CLI_SMALL)  # fmt: skip
    assert images_of(client.post("/sdapi/v1/txt2img", json=payload)) == cli


@pytest.mark.parametrize("invert", [0, 1])
def test_img2img_with_mask_is_the_cli_inpaint_bytes(served, tiny_checkpoint, init_and_mask, tmp_path, invert):
    client, _ = served
    init, mask = init_and_mask
    payload = {"prompt": "a door", "seed": 11, **SMALL, "sampler_name": "Euler", "init_images": [b64(init)],
               "mask": "data:image/png;base64," + b64(mask), "mask_blur": 2, "denoising_strength": 0.8,
               "inpainting_mask_invert": invert, "resize_mode": 1}  # fmt: skip
    flags = ("--invert-mask",) if invert else ()
    cli = cli_images("inpaint", "a door", "--seed", 11, "--sampler", "Euler", "--init", init, "--mask", mask,
                     "--mask-blur", 2, "--strength", 0.8, *flags, "--model", tiny_checkpoint, "--outdir", tmp_path,
                     *CLI_SMALL)  # fmt: skip
    response = client.post("/sdapi/v1/img2img", json=payload)
    assert images_of(response) == cli
    assert response.json()["parameters"]["init_images"] is None  # as A1111: not sent back


def test_img2img_without_mask_is_the_cli_img2img_bytes(served, tiny_checkpoint, init_and_mask, tmp_path):
    client, _ = served
    init, _ = init_and_mask
    payload = {"prompt": "a harbour", "seed": 4, "steps": 4, "init_images": [b64(init)], "denoising_strength": 0.5}
    cli = cli_images("img2img", "a harbour", "--seed", 4, "--init", init, "--strength", 0.5, "--model", tiny_checkpoint,
                     "--outdir", tmp_path, *CLI_SMALL, "--steps", 4)  # fmt: skip
    assert images_of(client.post("/sdapi/v1/img2img", json=payload)) == cli


# The defaults A1111's /docs page shows for txt2img (its pydantic model), as clients copy them, at a small size.
A1111_TXT2IMG_EXAMPLE = {
    "prompt": "", "negative_prompt": "", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "Euler", "scheduler": "Automatic",
    "batch_size": 1, "n_iter": 1, "steps": 2, "cfg_scale": 7, "width": 64, "height": 64, "restore_faces": False,
    "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False, "eta": 0, "denoising_strength": 0,
    "s_min_uncond": 0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 0, "override_settings": {},
    "override_settings_restore_afterwards": True, "refiner_checkpoint": "", "refiner_switch_at": 0,
    "disable_extra_networks": False, "firstpass_image": "", "comments": {}, "enable_hr": False, "firstphase_width": 0,
    "firstphase_height": 0, "hr_scale": 2, "hr_upscaler": "", "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": "", "hr_sampler_name": "", "hr_scheduler": "", "hr_prompt": "",
    "hr_negative_prompt": "", "force_task_id": "", "sampler_index": "Euler", "script_name": "", "script_args": [],
    "send_images": True, "save_images": False, "alwayson_scripts": {}, "infotext": "",
}  # fmt: skip


def test_a1111_payload_examples_are_accepted(served, init_and_mask):
    client, _ = served
    assert len(images_of(client.post("/sdapi/v1/txt2img", json=A1111_TXT2IMG_EXAMPLE))) == 1
    assert len(images_of(client.post("/sdapi/v1/txt2img", json={"prompt": "puppy dog", **SMALL}))) == 1
    init, mask = init_and_mask
    # What the webuiapi package sends for img2img with a mask, at its defaults.
    webuiapi = {**A1111_TXT2IMG_EXAMPLE, "init_images": [b64(init)], "mask": b64(mask), "resize_mode": 0,
                "denoising_strength": 0.75, "image_cfg_scale": 1.5, "mask_blur": 4, "inpainting_fill": 0,
                "inpaint_full_res": False, "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0,
                "include_init_images": False}  # fmt: skip
    for name in ("enable_hr", "firstphase_width", "firstphase_height", "hr_scale", "firstpass_image"):
        webuiapi.pop(name)
    assert len(images_of(client.post("/sdapi/v1/img2img", json=webuiapi))) == 1


def test_an_unmodified_webuiapi_client_gets_images(tiny_checkpoint, tmp_path):
    webuiapi = pytest.importorskip("webuiapi")
    service = make_service(tiny_checkpoint, tmp_path, users={"ann": "s3cret"}, max_body=10_000_000)
    with running(service) as client:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=client.base_url.port, sampler="Euler a", steps=2)
        api.set_auth("ann", "s3cret")
        made = api.txt2img(prompt="a cat", width=64, height=64, seed=3, n_iter=2)
        assert [image.size for image in made.images] == [(64, 64)] * 2 and made.info["all_seeds"] == [3, 4]
        init = Image.new("RGB", (64, 64), (200, 50, 50))
        assert api.img2img(images=[init], prompt="x", width=64, height=64, seed=1).image.size == (64, 64)
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (10, 10, 40, 40))
        inpainted = api.img2img(images=[init], mask_image=mask, prompt="x", width=64, height=64, inpaint_full_res=False)
        assert "Mask blur: 4" in inpainted.info["infotexts"][0]
        assert api.util_get_current_model() in api.util_get_model_names()


def test_bad_requests_are_refused_with_a_reason_and_the_server_keeps_serving(served):
    client, _ = served
    cases = [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "json"),
        ({"json": {"prompt": "x", "steps": "many"}}, 422, "steps"),
        ({"json": {"prompt": "x", "restore_faces": True}}, 422, "restore_faces"),
        ({"json": {"prompt": "x", "enable_hr": True, "hr_scale": 2}}, 422, "enable_hr"),
        ({"json": {"prompt": "x", "made_up_field": 1}}, 422, "made_up_field"),
        ({"json": {"prompt": "x", "override_settings": {"sd_vae": "x.pt"}}}, 422, "override_settings.sd_vae"),
        ({"json": {"prompt": "x", "sampler_name": "Euler a", "eta": 0.5}}, 422, "eta"),
        ({"json": {"prompt": "x", "scheduler": "Beta"}}, 422, "scheduler"),
        ({"json": {"prompt": "x", "s_churn": 0.5}}, 422, "s_churn"),
        ({"json": {"prompt": "x", "sampler_name": "no such sampler"}}, 422, "unknown sampler"),
        ({"json": {"prompt": "x", "width": 4096, "height": 4096}}, 422, "--max-pixels"),
        ({"json": {"prompt": "x", "width": 60}}, 422, "multiple of 8"),
        ({"json": {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}}, 422, "never given as paths"),
        ({"content": b"x" * 400_000}, 413, "--max-body"),
    ]
    for request, status, reason in cases:
        response = client.post("/sdapi/v1/txt2img", **request)
        assert response.status_code == status, (request, response.text)
        assert reason in response.text, response.text
    response = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["not base64!"]})
    assert response.status_code == 422 and "init_images" in response.text
    response = client.post(
        "/sdapi/v1/img2img", json={"prompt": "x", "init_images": [base64.b64encode(b"GIF").decode()]}
    )
    assert response.status_code == 422 and "init_images" in response.text
    assert client.get("/health").json()["status"] == "ok"
    assert len(images_of(client.post("/sdapi/v1/txt2img", json={"prompt": "still here", **SMALL}))) == 1


def test_listing_endpoints_speak_a1111(served):
    client, _ = served
    models = client.get("/sdapi/v1/sd-models").json()
    assert models[0]["model_name"] == "tiny-sd1" and models[0]["title"].startswith("tiny-sd1.safetensors [")
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models[0]["title"]
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert {"Euler a", "DPM++ 2M Karras", "DDIM"} <= set(names)
    assert "karras" in [s["name"] for s in client.get("/sdapi/v1/schedulers").json()]
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_the_model_switches_only_to_files_of_the_weights_folder(served, tiny_checkpoint, tiny_inpaint_checkpoint):
    client, service = served
    shutil.copy(tiny_checkpoint, service.settings.weights_dir / "other.safetensors")
    shutil.copy(tiny_inpaint_checkpoint, service.settings.weights_dir / "inpainting.safetensors")
    inpainting = {"prompt": "x", **SMALL, "override_settings": {"sd_model_checkpoint": "inpainting"}}
    response = client.post("/sdapi/v1/txt2img", json=inpainting)
    assert response.status_code == 422 and "inpainting model" in response.text
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL, "override_settings": {
        "sd_model_checkpoint": "other.safetensors [0123456789]"}})  # fmt: skip
    assert images_of(response) and json.loads(response.json()["info"])["sd_model_name"] == "other"
    assert service.models.model.path.name == "other.safetensors"  # kept loaded, but not the default (as A1111)
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny-sd1.safetensors")
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL})
    assert json.loads(response.json()["info"])["sd_model_name"] == "tiny-sd1"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("other.safetensors")
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd1"}).status_code == 200
    assert service.models.model.path.name == "tiny-sd1.safetensors"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": tiny_checkpoint}).status_code == 422
    assert client.post("/sdapi/v1/options", json={"show_progressbar": True}).status_code == 422


def test_a_full_queue_answers_429_and_concurrent_clients_each_get_their_images(served):
    client, service = served
    gate = threading.Event()
    blockers = [service.queue.submit(gate.wait)]  # the job in flight
    while not service.queue.busy:
        time.sleep(0.01)
    blockers += [service.queue.submit(lambda: None) for _ in range(service.settings.queue)]
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL})
    assert response.status_code == 429 and "queue is full" in response.text
    gate.set()
    for blocker in blockers:
        blocker.result()

    results: dict[int, httpx.Response] = {}

    def ask(seed: int) -> None:
        results[seed] = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": seed, **SMALL})

    threads = [threading.Thread(target=ask, args=(seed,)) for seed in (21, 22, 23)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {seed: json.loads(r.json()["info"])["seed"] for seed, r in results.items()} == {21: 21, 22: 22, 23: 23}
    assert len({images_of(r)[0] for r in results.values()}) == 3


def wait_for_sampling(client) -> None:
    while client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] == 0:
        time.sleep(0.02)


def test_interrupt_stops_the_job_in_flight(served):
    client, _ = served
    answer: dict = {}
    payload = {"prompt": "x", "width": 64, "height": 64, "steps": 1000, "sampler_name": "Euler", "n_iter": 3}
    thread = threading.Thread(target=lambda: answer.update(r=client.post("/sdapi/v1/txt2img", json=payload)))
    thread.start()
    wait_for_sampling(client)
    progress = client.get("/sdapi/v1/progress").json()
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 1000
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.size == (8, 8)  # the latents' resolution
    assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
    assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": True}
    thread.join()
    response = answer["r"]
    assert response.status_code == 200 and response.json()["images"] == []
    assert json.loads(response.json()["info"])["interrupted"] is True
    assert len(images_of(client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL}))) == 1


def test_out_of_memory_is_507_a_bug_500_and_the_server_keeps_serving(served, monkeypatch):
    import sdcli.batch

    client, _ = served

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with monkeypatch.context() as patched:
        patched.setattr(sdcli.batch, "generate", out_of_memory)
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL})
    assert response.status_code == 507 and "out of memory" in response.text

    def broken(*args, **kwargs):
        raise ValueError("a bug")

    with monkeypatch.context() as patched:
        patched.setattr(sdcli.batch, "generate", broken)
        assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL}).status_code == 500
    assert len(images_of(client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL}))) == 1


def test_a_batch_that_cannot_fit_beside_the_model_is_507_before_sampling(served, monkeypatch):
    import sdcli.batch
    import sdcli.server_jobs

    client, _ = served
    # Free memory between what a 64x64 image and a 1024x1024 one need (weights excluded: they are loaded).
    need = [estimate(TINY_SD1, size, size, 1, cfg=7.0, dtype_bytes=4, weights=0, vae_tiled=True).total
            for size in (64, 1024)]  # fmt: skip
    free = 2 * need[0]
    assert free < need[1]
    sampled = []
    with monkeypatch.context() as patched:
        patched.setattr(sdcli.server_jobs, "available_memory", lambda device: free)
        patched.setattr(sdcli.batch, "generate", lambda *a, **k: sampled.append(1))  # must not be reached
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 1024, "height": 1024})
        assert response.status_code == 507 and "needs about" in response.text and sampled == []
        # A small batch fits in the same memory: the loaded weights are not counted again.
        patched.undo()
        patched.setattr(sdcli.server_jobs, "available_memory", lambda device: free)
        assert len(images_of(client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL}))) == 1


def test_authentication_basic_or_bearer(tiny_checkpoint, tmp_path):
    service = make_service(tiny_checkpoint, tmp_path, users={"ann": "s3cret"}, token="tok-123")
    with running(service, log_json=True) as client:
        assert client.get("/sdapi/v1/options").status_code == 401
        assert client.get("/sdapi/v1/options", auth=("ann", "wrong")).status_code == 401
        assert client.get("/sdapi/v1/options", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/sdapi/v1/options", auth=("ann", "s3cret")).status_code == 200
        assert client.get("/sdapi/v1/options", headers={"Authorization": "Bearer tok-123"}).status_code == 200
        assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL}).status_code == 401
        assert client.get("/health").status_code == 200  # for supervisors


def test_serve_refuses_a_public_address_without_auth_and_a_port_in_use(monkeypatch):
    monkeypatch.delenv("SDCLI_API_AUTH", raising=False)
    monkeypatch.delenv("SDCLI_API_TOKEN", raising=False)
    for args, message in (
        (("--host", "0.0.0.0"), "--api-auth or --token"),
        (("--host", "::"), "--api-auth or --token"),
        (("--api-auth", "ann"), "user:password pairs"),
    ):
        result = run_cli("serve", *args, "--model", "whatever")
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("serve", "--port", taken.getsockname()[1], "--model", "whatever")
    assert result.exit_code == 1 and "cannot listen on 127.0.0.1" in result.output


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_sigterm_cancels_the_job_and_exits_cleanly(tiny_checkpoint, tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "sdcli", "serve", "--model", tiny_checkpoint, "--port", str(port),
               "--device", "cpu", "--dtype", "fp32", "--log-json", "--weights-dir", str(tmp_path)]  # fmt: skip
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            while True:
                assert process.poll() is None, process.stderr.read()
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/health").status_code == 200:
                        break
                time.sleep(0.1)
            answer: dict = {}
            payload = {"prompt": "x", "width": 64, "height": 64, "steps": 1000, "sampler_name": "Euler"}
            thread = threading.Thread(target=lambda: answer.update(r=client.post("/sdapi/v1/txt2img", json=payload)))
            thread.start()
            wait_for_sampling(client)
            process.send_signal(signal.SIGTERM)
            thread.join()
        assert process.wait(timeout=120) == 0
        assert answer["r"].status_code == 200 and json.loads(answer["r"].json()["info"])["interrupted"] is True
        log = process.stderr.read()
        records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]  # --log-json
        assert {"client": "127.0.0.1", "method": "POST", "path": "/sdapi/v1/txt2img", "status": 200}.items() <= [
            r for r in records if r.get("path") == "/sdapi/v1/txt2img"
        ][0].items()
        assert records[-1] == {"message": "stopped"} and "Traceback" not in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_closing_the_queue_interrupts_the_job_and_cancels_the_waiting_ones():
    from sdcli.server_queue import JobQueue, QueueClosed, QueueFull

    jobs = JobQueue(1)
    started, seen_stop = threading.Event(), threading.Event()

    def running_job() -> str:
        started.set()
        while not jobs.interrupted():
            time.sleep(0.01)
        seen_stop.set()
        return "stopped"

    first = jobs.submit(running_job)
    started.wait()
    waiting = jobs.submit(lambda: "never")
    with pytest.raises(QueueFull):
        jobs.submit(lambda: "no room")
    jobs.close()
    assert first.result() == "stopped" and seen_stop.is_set()
    with pytest.raises(QueueClosed):
        waiting.result()
    with pytest.raises(QueueClosed):
        jobs.submit(lambda: "too late")
