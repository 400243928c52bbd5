"""Rollouts from a rollout server (transformers engine, real HTTP on localhost) and the weight
sync that keeps it on-policy; the vLLM engine where vllm imports and a GPU exists."""

from __future__ import annotations

import copy
import json
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from ume_retriever import Item


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    from transformers import AutoConfig

    from ume_train.rollouts.server import RolloutServer, TransformersEngine
    from ume_train.rollouts.wire import config_fingerprint

    engine = TransformersEngine(str(tiny_ckpt), device="cpu", dtype="float32")
    srv = RolloutServer(engine, model=str(tiny_ckpt), fingerprint=config_fingerprint(AutoConfig.from_pretrained(tiny_ckpt)),
                        host="127.0.0.1", port=0, engine_name="transformers").start()
    yield srv
    srv.shutdown()


@pytest.fixture()
def policy(encoder):
    """The trainer's side: its own copy of the tiny model (the server loaded another)."""
    return copy.deepcopy(encoder.model)


def _prompts(encoder, mp4_path, tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    image.save(tmp_path / "noise.png")
    items = [Item(text="a red circle"), Item(text="find it", image=tmp_path / "noise.png"), Item(video=mp4_path)]
    return [encoder.preparer.prepare(i) for i in items]


def _local(policy, encoder, prompts, seeds, max_new_tokens=8, num_generations=3):
    from ume_train.rollouts import TransformersRollouts

    local = TransformersRollouts(policy, encoder.processor, encoder.token_ids, max_new_tokens=max_new_tokens)
    return local.generate(prompts, num_generations, seeds)


def test_generate_request_round_trip(encoder, mp4_path, tmp_path):
    from ume_train.rollouts.wire import SamplingRequest, decode_generate_request, encode_generate_request

    prompts = _prompts(encoder, mp4_path, tmp_path)
    sampling = SamplingRequest(num_generations=4, seeds=[1, 2, 3], max_new_tokens=9, temperature=0.7, top_p=0.9)
    back, sampling_back = decode_generate_request(encode_generate_request(prompts, sampling))
    assert sampling_back == sampling
    for p, q in zip(prompts, back):
        assert q.prompt == p.prompt and q.disc_position == p.disc_position
        assert torch.equal(q.input_ids, p.input_ids)
        assert sorted(q.vision) == sorted(p.vision)
        for key in p.vision:
            assert torch.equal(q.vision[key], p.vision[key]), key
        assert [np.asarray(i).tolist() for i in q.images] == [np.asarray(i.convert("RGB")).tolist() for i in p.images]
        assert (q.video is None) == (p.video is None)
        if p.video is not None:
            assert len(q.video) == len(p.video)
            assert all(np.array_equal(np.asarray(a), np.asarray(b.convert("RGB"))) for a, b in zip(q.video, p.video))


def test_server_rollouts_equal_local_and_follow_the_weight_sync(server, policy, encoder, mp4_path, tmp_path):
    """Same seeds -> the same rollouts as sampling on the policy itself; after the policy changes
    and syncs, the server holds exactly its weights and samples what the changed policy would."""
    from ume_train.rollouts.client import ServerRollouts

    prompts = _prompts(encoder, mp4_path, tmp_path)
    seeds = [11, 12, 13]
    client = ServerRollouts(server.url, max_new_tokens=8, connect_timeout=10)
    client.check_model(policy.config)
    client.sync_weights(policy)  # the server may hold another test's weights
    before = client.generate(prompts, 3, seeds)
    assert before == _local(policy, encoder, prompts, seeds)
    assert all(len(r.completion_ids) <= 8 for g in before for r in g)

    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    updates = server.health()["weight_updates"]
    client.chunk_bytes = 4096  # several chunks even for the tiny model
    client.sync_weights(policy)
    assert server.health()["weight_updates"] == updates + 1
    served = dict(server.engine.model.named_parameters())
    for name, p in policy.named_parameters():
        assert torch.equal(served[name], p), name
    after = client.generate(prompts, 3, seeds)
    assert after == _local(policy, encoder, prompts, seeds)
    assert after != before


def test_server_refuses_another_model_and_bad_requests(server, policy):
    from ume_train.rollouts.client import RolloutServerError, ServerRollouts
    from ume_train.rollouts.weight_sync import to_bytes

    client = ServerRollouts(server.url, max_new_tokens=4, connect_timeout=10)
    other = copy.deepcopy(policy.config)
    other.text_config.vocab_size += 1
    with pytest.raises(ValueError, match="vocab_size"):
        client.check_model(other)
    with pytest.raises(RolloutServerError, match="400 ValueError: not a safetensors blob"):
        client._request("POST", "/generate", b"junk")
    with pytest.raises(RolloutServerError, match="parameters this model does not have: \\['no.such.weight'\\]"):
        client._request("POST", "/update_weights", to_bytes({"no.such.weight": torch.zeros(2)}))
    name, param = next(iter(policy.named_parameters()))
    with pytest.raises(RolloutServerError, match=f"{name}: got shape \\(3,\\)"):
        client._request("POST", "/update_weights", to_bytes({name: torch.zeros(3)}))
    with pytest.raises(RolloutServerError, match="404"):
        client._request("POST", "/nowhere", b"")
    with urllib.request.urlopen(server.url + "/health") as resp:  # still serving
        assert json.loads(resp.read())["engine"] == "transformers"


def test_client_names_the_missing_server():
    from ume_train.rollouts.client import RolloutServerError, ServerRollouts

    with pytest.raises(RolloutServerError, match="no rollout server at http://127.0.0.1:9 after 0 s"):
        ServerRollouts("http://127.0.0.1:9", max_new_tokens=4, connect_timeout=0)


def test_grpo_trains_against_the_server_and_syncs_each_step(server, tiny_ckpt, tmp_path):
    """Two GRPO steps with rollout_backend='server': one weight sync before each step's
    rollouts, so afterwards the server holds the policy as it was after step 1."""
    from transformers import TrainerCallback

    from test_train_grpo import _grpo_args
    from ume_train.data.synthetic import make_dataset
    from ume_retriever.inputs.records import read_records
    from ume_train.grpo import GRPOTrainer

    class Snapshots(TrainerCallback):
        def __init__(self):
            self.after_step = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.after_step.append({n: p.detach().clone() for n, p in trainer.inner_model.named_parameters()})

    data = make_dataset(tmp_path / "shapes", train_per_scene=1, seed=0)
    records = read_records(data.train).records[:4]
    snapshots = Snapshots()
    args = _grpo_args(tmp_path, tiny_ckpt, rollout_backend="server", rollout_server_url=server.url,
                      rollout_server_timeout=10, beta=0.0)
    updates = server.health()["weight_updates"]
    def text_length(prompts, completions, **columns):  # varies between rollouts: a non-zero loss
        return [len(c) / 100 for c in completions]

    trainer = GRPOTrainer(args=args, train_dataset=records, callbacks=[snapshots], reward_funcs=[text_length])
    trainer.train()
    assert server.health()["weight_updates"] == updates + 2
    served = dict(server.engine.model.named_parameters())
    assert all(torch.equal(served[n], p) for n, p in snapshots.after_step[0].items())
    assert not all(torch.equal(served[n], p) for n, p in snapshots.after_step[1].items())
    logged = [h for h in trainer.state.log_history if "query_reward" in h]
    assert len(logged) == 2 and all(np.isfinite(h["query_reward"]) for h in logged)


def test_rollout_from_vllm_matches_the_transformers_convention():
    from ume_train.rollouts.vllm_engine import rollout_from_vllm

    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    # stopped on an end-of-turn id vLLM left out: it is added back, the text has no end token
    assert rollout_from_vllm([5, 6], "stop", [9, 10], decode).completion_ids == [5, 6, 9]
    assert rollout_from_vllm([5, 6], "stop", [9, 10], decode).text == "5 6"
    # vLLM kept it: nothing added
    assert rollout_from_vllm([5, 10], "stop", [9, 10], decode).completion_ids == [5, 10]
    # ran out of tokens: no end token
    r = rollout_from_vllm([5, 6, 7], "length", [9], decode)
    assert r.completion_ids == [5, 6, 7] and r.text == "5 6 7"


def test_weight_chunks_and_names_fit_the_checkpoint(tiny_ckpt, policy):
    """Chunks respect the byte cap and cover every parameter once; the names load back into a
    freshly loaded model of the checkpoint (what the server's engines do)."""
    from transformers import Qwen2VLForConditionalGeneration

    from ume_train.rollouts.weight_sync import load_full_weights, named_full_weights, weight_chunks

    chunks = list(weight_chunks(named_full_weights(policy), max_bytes=8192))
    names = [n for c in chunks for n in c]
    assert names == [n for n, _ in policy.named_parameters()]
    for c in chunks:
        sizes = [t.numel() * t.element_size() for t in c.values()]
        assert len(c) == 1 or sum(sizes) <= 8192
    fresh = Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32)
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.5)
    for c in chunks:
        load_full_weights(fresh, c)
    assert all(torch.equal(dict(fresh.named_parameters())[n], p) for n, p in policy.named_parameters())


def test_vllm_rollouts_sync_and_sample(tiny_ckpt, encoder, mp4_path, tmp_path, monkeypatch):
    """vLLM colocated engine: samples well-formed rollouts; a sync changes its weights and its samples."""
    pytest.importorskip("vllm", reason="vllm is not installed (optional 'vllm' extra): vLLM rollouts not tested")
    if not torch.cuda.is_available():
        pytest.skip("vLLM rollouts need a CUDA GPU")
    import gc
    import torch.distributed as dist

    from helpers import free_port
    from ume_train.rollouts.vllm_engine import VLLMRollouts

    # torchrun's variables for this test only (external_launcher reads them)
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    try:
        _check_vllm_rollouts(VLLMRollouts, tiny_ckpt, encoder, mp4_path, tmp_path)
    finally:
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_vllm_rollouts(VLLMRollouts, tiny_ckpt, encoder, mp4_path, tmp_path):  # noqa: N803

    rollouts = VLLMRollouts(str(tiny_ckpt), encoder.processor.tokenizer, encoder.token_ids, max_new_tokens=8,
                            dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True)
    prompts = _prompts(encoder, mp4_path, tmp_path)
    out = rollouts.generate(prompts, 3, [1, 2, 3])
    assert [len(g) for g in out] == [3, 3, 3]
    assert all(0 < len(r.completion_ids) <= 9 for g in out for r in g)
    assert out == rollouts.generate(prompts, 3, [1, 2, 3])  # seeded
    sums = rollouts.llm.collective_rpc("ume_parameter_sums")[0]
    model = copy.deepcopy(encoder.model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    rollouts.sync_weights(model)
    doubled = rollouts.llm.collective_rpc("ume_parameter_sums")[0]
    changed = [n for n in sums if abs(doubled[n] - 2 * sums[n]) <= 1e-3 * max(1.0, abs(sums[n]))]
    assert len(changed) == len(sums), sorted(set(sums) - set(changed))[:5]
    assert rollouts.generate(prompts, 3, [1, 2, 3]) != out  # new weights, new samples (prefix cache reset)
    del rollouts


@pytest.mark.slow
def test_rollout_server_command(tiny_ckpt, encoder, capsys):
    """`ume-train rollout-server` in its own process: a trainer-side client finds it, checks the
    model and gets the rollouts that sampling on the same weights gives (both sides with the
    same thread count); bad options exit 1."""
    import subprocess
    import sys

    from helpers import compared_run_threads, free_port, worker_env
    from ume_train.rollouts.client import ServerRollouts

    port = free_port()
    cli = [sys.executable, "-m", "ume_train.cli", "rollout-server", "--model", str(tiny_ckpt), "--engine", "transformers"]
    env = worker_env()
    from ume_train.cli import main

    assert main([*cli[3:], "--tensor-parallel-size", "2"]) == 1
    assert "--engine transformers takes no --tensor-parallel-size" in capsys.readouterr().err
    proc = subprocess.Popen([*cli, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = ServerRollouts(f"http://127.0.0.1:{port}", max_new_tokens=6, connect_timeout=120)
        assert client.info["engine"] == "transformers" and client.info["model"] == str(tiny_ckpt)
        client.check_model(encoder.model.config)
        prompts = [encoder.preparer.prepare(Item(text="a blue square"))]
        served = client.generate(prompts, 2, [5])
        with compared_run_threads():
            assert served == _local(encoder.model, encoder, prompts, [5], max_new_tokens=6, num_generations=2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_config_names_a_wrong_rollout_backend(tmp_path, tiny_ckpt):
    from test_train_grpo import _grpo_args

    with pytest.raises(ValueError, match="rollout_backend must be one of"):
        _grpo_args(tmp_path, tiny_ckpt, rollout_backend="sglang")


@pytest.mark.slow
def test_two_processes_sync_once_and_sample_the_synced_weights(server, tiny_ckpt, tmp_path):
    from helpers import run_worker

    updates = server.health()["weight_updates"]
    run_worker("server_sync.py", tiny_ckpt, server.url, tmp_path / "out", nproc=2, cwd=tmp_path)
    assert server.health()["weight_updates"] == updates + 1  # process 0 sent, process 1 only gathered
    from transformers import Qwen2VLForConditionalGeneration

    original = Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32)
    served = dict(server.engine.model.named_parameters())
    assert all(torch.equal(served[n], -p) for n, p in original.named_parameters())
    assert all(torch.load(tmp_path / f"out.{rank}")["equal"] for rank in (0, 1))


def test_a_failed_sync_raises_and_names_the_server(server, policy):
    from ume_train.rollouts.client import RolloutServerError, ServerRollouts

    client = ServerRollouts(server.url, max_new_tokens=4, connect_timeout=10)
    policy.register_parameter("extra", torch.nn.Parameter(torch.zeros(2)))  # a parameter the server lacks
    updates = server.health()["weight_updates"]
    with pytest.raises(RolloutServerError, match="weight sync failed: .*parameters this model does not have: \\['extra'\\]"):
        client.sync_weights(policy)
    assert server.health()["weight_updates"] == updates  # never finished


def test_client_refuses_a_server_that_sizes_images_differently(server, encoder):
    from ume_retriever.model.checkpoint import pixel_caps, set_pixel_caps
    from ume_train.rollouts.client import ServerRollouts
    from ume_train.rollouts.server import RolloutServer

    other = copy.deepcopy(encoder.processor)
    set_pixel_caps(other, 64 * 28 * 28, 128 * 28 * 28)
    engine = server.engine
    engine.pixel_caps = pixel_caps(other)  # as a vLLM engine started with those caps reports them
    try:
        second = RolloutServer(engine, model="m", fingerprint=server.info["fingerprint"], host="127.0.0.1", port=0)
    finally:
        del engine.pixel_caps
    second.start()
    try:
        client = ServerRollouts(second.url, max_new_tokens=4, connect_timeout=10)
        assert client.info["pixel_caps"]["image_processor"] == [64 * 28 * 28, 128 * 28 * 28]
        client.check_model(encoder.model.config)  # architecture alone agrees
        with pytest.raises(ValueError, match="sizes images with"):
            client.check_model(encoder.model.config, encoder.processor)
        client.check_model(encoder.model.config, other)
    finally:
        second.shutdown()


def test_fsdp1_wrapped_models_are_refused_and_bad_headers_get_400(server):
    import http.client
    from urllib.parse import urlparse

    from ume_train.rollouts.weight_sync import named_full_weights

    wrapped = torch.nn.Module()
    wrapped._fsdp_wrapped_module = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="FSDP version 1"):
        next(named_full_weights(wrapped))
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.putrequest("POST", "/generate")
    conn.putheader("Content-Length", "many")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 400 and json.loads(resp.read())["error"] == "bad Content-Length"
    conn.close()


def test_concurrent_requests_share_one_engine_call_and_a_bad_one_fails_alone(server, policy, encoder):
    """Requests that wait while the engine is busy go together in its next call, each gets
    exactly its own rollouts; a request the engine chokes on fails alone."""
    from ume_train.rollouts.client import RolloutServerError, ServerRollouts

    client = ServerRollouts(server.url, max_new_tokens=6, connect_timeout=10)
    client.sync_weights(policy)
    texts = ["a red circle", "a blue square at the top", "two green crosses"]
    prompts = [encoder.preparer.prepare(Item(text=t)) for t in texts]
    broken = copy.copy(prompts[0])  # passes the request checks; the model's patch embedding chokes on it
    pixels = broken.vision["pixel_values"]
    broken.vision = {**broken.vision, "pixel_values": pixels[:, :-1]}
    requests = [([prompts[0]], [3]), ([prompts[1], prompts[2]], [4, 5]), ([broken], [6])]
    results: dict[int, object] = {}

    def post(i):
        try:
            results[i] = client.generate(requests[i][0], 2, requests[i][1])
        except RolloutServerError as exc:
            results[i] = exc

    calls = server.sampler.engine_calls
    _post_while_engine_busy(server, [lambda i=i: post(i) for i in range(3)])
    # one merged call (fails on the broken prompt), then the three retried one by one
    assert server.sampler.engine_calls == calls + 4
    assert results[0] == _local(policy, encoder, [prompts[0]], [3], max_new_tokens=6, num_generations=2)
    assert results[1] == _local(policy, encoder, prompts[1:], [4, 5], max_new_tokens=6, num_generations=2)
    assert isinstance(results[2], RolloutServerError) and "500" in str(results[2])
    assert server.health()["status"] == "ok"


def test_merged_requests_are_served_in_one_call(server, policy, encoder):
    from ume_train.rollouts.client import ServerRollouts

    client = ServerRollouts(server.url, max_new_tokens=5, connect_timeout=10)
    client.sync_weights(policy)
    prompts = [encoder.preparer.prepare(Item(text=t)) for t in ("one", "two", "three", "four")]
    results: dict[int, object] = {}
    calls = server.sampler.engine_calls
    _post_while_engine_busy(server, [lambda i=i: results.__setitem__(i, client.generate([prompts[i]], 2, [i]))
                                     for i in range(4)])
    assert server.sampler.engine_calls == calls + 1
    for i in range(4):
        assert results[i] == _local(policy, encoder, [prompts[i]], [i], max_new_tokens=5, num_generations=2)


def _post_while_engine_busy(server, posts) -> None:
    """Run each ``post`` in its own thread while the server's engine is held, so that all of
    them are queued when it frees up; wait for them to finish."""
    import threading
    import time

    with server.sampler.engine_lock:
        threads = [threading.Thread(target=post) for post in posts]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(server.sampler._pending) < len(posts) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(server.sampler._pending) == len(posts)
    for t in threads:
        t.join(timeout=60)


# -- hardening (issue 14, case 3): real HTTP on localhost ----------------------------------------

API_KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def guarded(server):
    """The same engine behind a server with an API key and a 1-second socket timeout."""
    from ume_train.rollouts.server import RolloutServer

    srv = RolloutServer(server.engine, model="m", fingerprint=server.info["fingerprint"], host="127.0.0.1", port=0,
                        api_key=API_KEY, timeout=1.0).start()
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def small(server):
    """The same engine behind a server that takes bodies of at most 64 KiB."""
    from ume_train.rollouts.server import RolloutServer
    from ume_train.rollouts.wire import RequestLimits

    srv = RolloutServer(server.engine, model="m", fingerprint=server.info["fingerprint"], host="127.0.0.1", port=0,
                        limits=RequestLimits(max_body_bytes=64 * 1024)).start()
    yield srv
    srv.shutdown()


def _raw(srv, data: bytes, *, wait: float = 10.0) -> tuple[bytes, float]:
    """Send ``data`` on a fresh socket; (everything the server sent until it closed, seconds taken)."""
    import socket
    import time
    from urllib.parse import urlparse

    url = urlparse(srv.url)
    start = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=wait) as sock:
        sock.sendall(data)
        got = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got, time.monotonic() - start
            got += chunk


def _status_and_error(reply: bytes) -> tuple[int, str]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def _post_head(path: str, *headers: str) -> bytes:
    return ("\r\n".join([f"POST {path} HTTP/1.1", "Host: localhost", *headers]) + "\r\n\r\n").encode()


def test_rollout_server_answers_413_to_a_body_above_max_body_bytes(server, small, policy):
    from ume_train.rollouts.client import RolloutServerError, ServerRollouts
    from ume_train.rollouts.wire import RequestLimits

    # the default takes the largest tensor a 7B sync sends alone: Qwen2-VL-7B's embeddings in bf16
    assert RequestLimits().max_body_bytes == 2 * 2**30 > 152064 * 3584 * 2
    # 3 GiB promised, nothing sent: refused at once from the header, the body never waited for
    reply, seconds = _raw(server, _post_head("/update_weights", f"Content-Length: {3 * 2**30}"))
    status, error = _status_and_error(reply)
    assert status == 413 and f"a body of {3 * 2**30} bytes is above this server's max_body_bytes={2 * 2**30}" in error
    assert seconds < 5
    # a real 100 KiB body against a 64 KiB cap: the reply still reaches the client
    reply, _ = _raw(small, _post_head("/generate", f"Content-Length: {100 * 1024}") + b"x" * (100 * 1024))
    assert _status_and_error(reply)[0] == 413
    # the client knows the cap from /health and names what does not fit, before sending it
    client = ServerRollouts(small.url, max_new_tokens=4, connect_timeout=10)
    with pytest.raises(RolloutServerError, match="above the server's max_body_bytes=65536.*--max-body-bytes.*weights"):
        client.sync_weights(policy)
    assert client._request("GET", "/health")["status"] == "ok"


@pytest.mark.parametrize("headers, error", [
    (("Content-Length: -5",), "bad Content-Length: -5 is negative"),
    ((), "Content-Length is required"),
    (("Transfer-Encoding: chunked",), "chunked bodies are not accepted: send Content-Length"),
    (("Content-Length: 4", "Content-Length: 9"), "bad Content-Length: given more than once"),
])
def test_rollout_server_answers_400_to_a_negative_or_missing_content_length(server, headers, error):
    reply, _ = _raw(server, _post_head("/generate", *headers))
    assert _status_and_error(reply) == (400, error)
    with urllib.request.urlopen(server.url + "/health") as resp:  # still serving
        assert json.loads(resp.read())["status"] == "ok"


def test_rollout_server_times_out_a_client_that_never_sends_its_body(guarded):
    """A promised body that never comes: 408 after the socket timeout (1 s here), connection
    closed, the handler thread gone. A connection that sends nothing at all is closed too."""
    import threading
    import time

    before = set(threading.enumerate())
    head = _post_head("/update_weights", f"Authorization: Bearer {API_KEY}", "Content-Length: 100")
    reply, seconds = _raw(guarded, head + b"0123456789")
    assert _status_and_error(reply) == (408, "the body did not arrive within 1 s")
    assert 0.9 < seconds < 6
    reply, seconds = _raw(guarded, b"")  # connect, say nothing
    assert reply == b"" and seconds < 6
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(threading.enumerate()) - before


def _generate_body(encoder, texts=("a red circle",), **sampling):
    from ume_retriever import Item
    from ume_train.rollouts.wire import SamplingRequest, encode_generate_request

    prompts = [encoder.preparer.prepare(Item(text=t)) for t in texts]
    settings = {"num_generations": 2, "seeds": list(range(len(prompts))), "max_new_tokens": 4, **sampling}
    return prompts, encode_generate_request(prompts, SamplingRequest(**settings))


@pytest.mark.parametrize("bad, message", [
    ({"num_generations": 0}, "num_generations must be an integer in \\[1, 256\\], got 0"),
    ({"num_generations": 257}, "num_generations must be an integer in \\[1, 256\\], got 257"),
    ({"num_generations": True}, "num_generations must be an integer"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer in \\[1, 32768\\], got 0"),
    ({"max_new_tokens": 10**9}, "max_new_tokens must be an integer in \\[1, 32768\\]"),
    ({"max_new_tokens": 4.5}, "max_new_tokens must be an integer"),
    ({"temperature": 0.0}, "temperature must be in \\(0, 100.0\\], got 0.0"),
    ({"temperature": -1.0}, "temperature must be in"),
    ({"temperature": float("nan")}, "temperature must be in .*nan"),
    ({"temperature": float("inf")}, "temperature must be in .*inf"),
    ({"top_p": 0.0}, "top_p must be in \\(0, 1\\], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in \\(0, 1\\], got 1.5"),
    ({"top_p": "1"}, "top_p must be in"),
    ({"seeds": []}, "1 prompts but 0 seeds"),
    ({"seeds": [1, 2]}, "1 prompts but 2 seeds"),
    ({"seeds": [-1]}, "seeds must be integers in \\[0, 2\\*\\*63\\), got -1"),
    ({"seeds": [2**64]}, "seeds must be integers in \\[0, 2\\*\\*63\\)"),
    ({"seeds": [1.5]}, "seeds must be integers"),
])
def test_rollout_server_refuses_sampling_settings_out_of_bounds(server, encoder, bad, message):
    from ume_train.rollouts.client import RolloutServerError, ServerRollouts

    client = ServerRollouts(server.url, max_new_tokens=4, connect_timeout=10)
    _, body = _generate_body(encoder, **bad)
    calls = server.sampler.engine_calls
    with pytest.raises(RolloutServerError, match=f"400 ValueError: generate request: {message}"):
        client._request("POST", "/generate", body)
    assert server.sampler.engine_calls == calls  # refused before the engine


def test_rollout_server_refuses_too_many_prompts_in_one_request(server, encoder):
    from ume_train.rollouts.client import RolloutServerError, ServerRollouts
    from ume_train.rollouts.server import RolloutServer
    from ume_train.rollouts.wire import RequestLimits

    two = RolloutServer(server.engine, model="m", fingerprint=server.info["fingerprint"], host="127.0.0.1", port=0,
                        limits=RequestLimits(max_prompts=2)).start()
    try:
        client = ServerRollouts(two.url, max_new_tokens=4, connect_timeout=10)
        for texts in (("one", "two", "three"), ()):
            _, body = _generate_body(encoder, texts=texts)
            with pytest.raises(RolloutServerError,
                               match=f"the number of prompts must be an integer in \\[1, 2\\], got {len(texts)}"):
                client._request("POST", "/generate", body)
    finally:
        two.shutdown()


def test_rollout_server_refuses_token_ids_outside_the_vocabulary_before_the_model(server, encoder, policy):
    """ids >= the model's vocabulary (its embedding rows) or negative: 400, the engine never
    called (on a GPU they would poison the CUDA context); the last id of the vocabulary passes."""
    from ume_train.rollouts.client import RolloutServerError, ServerRollouts

    vocab = policy.get_input_embeddings().num_embeddings
    client = ServerRollouts(server.url, max_new_tokens=2, connect_timeout=10)
    client.sync_weights(policy)
    (prompt,), _ = _generate_body(encoder)

    def with_ids(ids, dtype=torch.long):
        p = copy.copy(prompt)
        p.input_ids = torch.cat([prompt.input_ids, torch.tensor(ids)]).to(dtype)
        p.mm_token_type_ids = torch.cat([prompt.mm_token_type_ids, torch.zeros(len(ids), dtype=torch.long)])
        return p

    calls = server.sampler.engine_calls
    for ids, bad in (([vocab], vocab), ([5, vocab + 1000], vocab + 1000), ([-1], -1)):
        with pytest.raises(RolloutServerError, match=f"400 ValueError: .*prompt 0: token id {bad} is outside the "
                                                     f"model's vocabulary \\(0..{vocab - 1}\\)"):
            client.generate([with_ids(ids)], 2, [0])
    with pytest.raises(RolloutServerError, match="input_ids must be a non-empty 1-d integer tensor, got torch.float32"):
        client.generate([with_ids([1], dtype=torch.float32)], 2, [0])
    assert server.sampler.engine_calls == calls
    assert len(client.generate([with_ids([vocab - 1])], 2, [0])[0]) == 2  # in range: sampled


def test_rollout_server_wants_its_api_key(guarded, encoder, monkeypatch):
    import time

    from ume_train.rollouts.client import RolloutServerError, ServerRollouts

    monkeypatch.delenv("UME_ROLLOUT_API_KEY", raising=False)
    get = "GET /health HTTP/1.1\r\nHost: localhost\r\n{}\r\n"
    for auth in ("", "Authorization: Bearer wrong-key\r\n", f"Authorization: Basic {API_KEY}\r\n",
                 f"Authorization: Bearer {API_KEY}x\r\n"):
        reply, _ = _raw(guarded, get.format(auth).encode())
        assert reply.startswith(b"HTTP/1.1 401") and b'WWW-Authenticate: Bearer realm="ume-rollout-server"' in reply
        assert "missing or wrong API key" in _status_and_error(reply)[1]
    reply, _ = _raw(guarded, get.format(f"Authorization: Bearer {API_KEY}\r\nConnection: close\r\n").encode())
    assert reply.startswith(b"HTTP/1.1 200")
    _, body = _generate_body(encoder)
    reply, _ = _raw(guarded, _post_head("/generate", f"Content-Length: {len(body)}") + body)
    assert _status_and_error(reply)[0] == 401
    start = time.monotonic()  # a 401 is final: the client does not wait out its connect timeout
    with pytest.raises(RolloutServerError, match="401 missing or wrong API key.*rollout_server_api_key or "
                                                 "\\$UME_ROLLOUT_API_KEY"):
        ServerRollouts(guarded.url, max_new_tokens=2, connect_timeout=60)
    assert time.monotonic() - start < 10
    with pytest.raises(RolloutServerError, match="401 .*the trainer's key is not the server's"):
        ServerRollouts(guarded.url, max_new_tokens=2, connect_timeout=60, api_key="nope")
    prompts, _ = _generate_body(encoder)
    assert len(ServerRollouts(guarded.url, max_new_tokens=2, api_key=API_KEY).generate(prompts, 2, [0])[0]) == 2
    monkeypatch.setenv("UME_ROLLOUT_API_KEY", API_KEY)  # the default key
    assert len(ServerRollouts(guarded.url, max_new_tokens=2).generate(prompts, 2, [0])[0]) == 2


def test_grpo_sends_rollout_server_api_key_and_never_writes_it_out(guarded, tiny_ckpt, tmp_path, monkeypatch):
    from test_train_grpo import _grpo_args
    from ume_retriever.inputs.records import read_records
    from ume_train.data.synthetic import make_dataset
    from ume_train.grpo import GRPOTrainer
    from ume_train.rollouts.client import RolloutServerError

    monkeypatch.delenv("UME_ROLLOUT_API_KEY", raising=False)
    data = make_dataset(tmp_path / "shapes", train_per_scene=1, seed=0)
    records = read_records(data.train).records[:2]
    common = dict(rollout_backend="server", rollout_server_url=guarded.url, rollout_server_timeout=30, beta=0.0,
                  max_steps=1)
    assert _grpo_args(tmp_path, tiny_ckpt, **common).rollout_server_api_key is None  # default: the env variable
    with pytest.raises(RolloutServerError, match="401"):
        GRPOTrainer(args=_grpo_args(tmp_path, tiny_ckpt, **common), train_dataset=records)
    args = _grpo_args(tmp_path, tiny_ckpt, rollout_server_api_key=API_KEY, **common)
    assert API_KEY not in repr(args) and API_KEY not in str(args) and API_KEY not in json.dumps(args.to_dict())
    updates = guarded.health()["weight_updates"]
    trainer = GRPOTrainer(args=args, train_dataset=records)
    trainer.train()
    assert guarded.health()["weight_updates"] == updates + 1
    trainer.save_model(str(tmp_path / "saved"))
    saved = (tmp_path / "saved" / "training_args.bin").read_bytes()
    assert API_KEY.encode() not in saved
    assert torch.load(tmp_path / "saved" / "training_args.bin", weights_only=False).rollout_server_api_key == \
        "<ROLLOUT_SERVER_API_KEY>"
    monkeypatch.setenv("UME_ROLLOUT_API_KEY", API_KEY)  # or from the environment
    GRPOTrainer(args=_grpo_args(tmp_path, tiny_ckpt, **common), train_dataset=records)


def test_rollout_server_refuses_a_non_loopback_address_without_an_api_key(server, tiny_ckpt, capsys, monkeypatch):
    from helpers import free_port
    from ume_train.cli import main
    from ume_train.rollouts.server import RolloutServer, is_loopback

    monkeypatch.delenv("UME_ROLLOUT_API_KEY", raising=False)
    code = main(["rollout-server", "--model", str(tiny_ckpt), "--engine", "transformers", "--host", "0.0.0.0",
                 "--port", str(free_port())])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("ume-train: error: refusing to listen on '0.0.0.0' without an API key")
    assert "--api-key" in err and "UME_ROLLOUT_API_KEY" in err and "--insecure" in err
    kwargs = dict(model="m", fingerprint=server.info["fingerprint"], port=0)
    with pytest.raises(ValueError, match="refusing to listen on '0.0.0.0'"):
        RolloutServer(server.engine, host="0.0.0.0", **kwargs)
    for extra in ({"insecure": True}, {"api_key": API_KEY}):
        RolloutServer(server.engine, host="0.0.0.0", **kwargs, **extra).shutdown()
    assert [is_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "localhost")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "", "::", "10.0.0.5", "192.168.1.2")] == [False] * 5
