"""Project policy over the rendered overlays: what vLLM users expect of a vLLM pod (deploy/README.md), and that
the pieces point at each other (profile mount <-> args, selectors <-> labels, ServiceMonitor <-> Service,
ScaledObject <-> Deployment)."""
from __future__ import annotations

import json
import posixpath
import re

import pytest

from deploytools import OVERLAYS, ROOT, by_kind, known_metric_names, metric_names, one, render

GPU = "nvidia.com/gpu"


@pytest.fixture(params=OVERLAYS)
def overlay(request):
    return request.param, render(f"overlays/{request.param}")


def container(objs) -> dict:
    dep = one(objs, "Deployment")
    cs = dep["spec"]["template"]["spec"]["containers"]
    assert len(cs) == 1, "one vLLM container per pod"
    return cs[0]


def pod_spec(objs) -> dict:
    return one(objs, "Deployment")["spec"]["template"]["spec"]


def env(c: dict) -> dict:
    return {e["name"]: e for e in c.get("env", [])}


def expand(arg: str, c: dict) -> str:
    """Expand $(VAR) as the kubelet does, from literal env values."""
    e = env(c)
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: e[m.group(1)]["value"], arg)


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} must appear exactly once in {args}"
    i = args.index(name)
    assert i + 1 < len(args), f"{name} has no value"
    return args[i + 1]


def additional_config(c: dict) -> dict:
    return json.loads(flag(c["args"], "--additional-config"))


def selector_matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- the command ----------------------------------------------------------------------------------------------

def test_runs_vllm_serve_with_the_hybridkv_backend(overlay):
    _, objs = overlay
    c = container(objs)
    assert c["command"] == ["vllm", "serve"]
    assert flag(c["args"], "--attention-backend") == "HYBRIDKV"
    assert flag(c["args"], "--port") == "8000"
    cfg = additional_config(c)["hybridkv"]
    assert cfg["profile"].startswith("/") and cfg["profile"].endswith(".json")
    assert 0 < float(cfg["budget"]) <= 1
    # the model is the first positional argument and every $(VAR) resolves to a real value
    model = expand(c["args"][0], c)
    assert model and "set-by-overlay" not in model and not model.startswith("-")
    for a in c["args"]:
        assert "set-by-overlay" not in expand(a, c)


def test_args_only_reference_defined_env(overlay):
    _, objs = overlay
    c = container(objs)
    for a in c["args"] + c["command"]:
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
            assert var in env(c) and "value" in env(c)[var], f"$({var}) in args is not a literal env var"


def test_plugin_is_allow_listed_by_its_entry_point_name(overlay):
    _, objs = overlay
    setup = (ROOT / "setup.py").read_text()
    m = re.search(r'"vllm\.general_plugins":\s*\["([^"=]+)=', setup)
    assert m, "setup.py declares no vllm.general_plugins entry point"
    assert env(container(objs))["VLLM_PLUGINS"]["value"] == m.group(1)


def test_profile_configmap_is_mounted_where_the_args_say(overlay):
    _, objs = overlay
    c = container(objs)
    profile = additional_config(c)["hybridkv"]["profile"]
    spec = pod_spec(objs)
    volumes = {v["name"]: v for v in spec["volumes"]}
    hits = []
    for vm in c["volumeMounts"]:
        mp = vm["mountPath"].rstrip("/")
        v = volumes[vm["name"]]
        if "configMap" not in v:
            continue
        if vm.get("subPath"):
            if mp == profile:
                hits.append((v, vm["subPath"]))
        elif posixpath.dirname(profile) == mp:
            fname = posixpath.basename(profile)
            items = v["configMap"].get("items")
            key = next((i["key"] for i in items if i["path"] == fname), None) if items else fname
            if key is not None:
                hits.append((v, key))
    assert len(hits) == 1, f"{profile} is not provided by exactly one ConfigMap mount: {hits}"
    v, key = hits[0]
    assert vm_is_readonly(c, v["name"])
    cms = {cm["metadata"]["name"]: cm for cm in by_kind(objs, "ConfigMap")}
    assert v["configMap"]["name"] in cms, f"ConfigMap {v['configMap']['name']} is not in the rendered overlay"
    data = cms[v["configMap"]["name"]]["data"]
    assert key in data, f"ConfigMap has no key {key}"
    json.loads(data[key])  # at least JSON (the schema check happens at startup: a placeholder fails loudly)
    assert not v["configMap"].get("optional"), "a missing profile must stop the pod, not start it uncompressed"


def vm_is_readonly(c: dict, name: str) -> bool:
    return any(vm["name"] == name and vm.get("readOnly") for vm in c["volumeMounts"])


def test_profile_configmap_name_is_content_hashed(overlay):
    """A new profile must roll the Deployment: kustomize's hash suffix changes the name the pod refers to."""
    _, objs = overlay
    names = [cm["metadata"]["name"] for cm in by_kind(objs, "ConfigMap")]
    assert any(re.fullmatch(r"hybridkv-profile-[a-z0-9]{10}", n) for n in names), names



def test_engine_flags_the_plugin_requires(overlay):
    """What ``adapter.runtime`` refuses at start-up must not be in the pod's command: vLLM turns prefix caching on
    by default and HYBRIDKV refuses it; vLLM's CPU attention needs blocks of a multiple of 32 tokens (the CPU
    overlay; CUDA's default block size works). tests/deploy/test_deploy_live_prometheus.py starts the cpu-demo
    Deployment's command for real."""
    name, objs = overlay
    args = container(objs)["args"]
    assert "--no-enable-prefix-caching" in args and "--enable-prefix-caching" not in args
    assert int(flag(args, "--block-size")) % 32 == 0           # every platform (CUDA's default, 16, is refused)


@pytest.mark.vllm
def test_pod_command_passes_the_plugins_start_up_checks_on_its_platform(overlay, monkeypatch, tmp_path):
    """The rendered container's command line, read by vLLM's own ``vllm serve`` parser, with the platform its
    overlay runs on (the GPU overlay: a CUDA stand-in platform, CUDA's defaults where a flag is absent), goes
    through every flag check the plugin makes at start-up (``adapter.runtime._check_flags``): none may refuse it."""
    from types import SimpleNamespace

    import vllm
    import vllm.platforms
    from vllm.config import CacheConfig
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from hybridkv_vllm.adapter import runtime
    from hybridkv_vllm.adapter.config import HybridKVConfig

    name, objs = overlay
    c = container(objs)
    assert c["command"] == ["vllm", "serve"]
    parser = FlexibleArgumentParser()
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subcommand"))
    command = [expand(a, c) for a in c["args"]]
    assert command[0] == env(c)["HYBRIDKV_MODEL"]["value"]
    command[0] = str(tmp_path)              # a local directory for the hub model: vLLM resolves the model's path
    args = parser.parse_args(["serve", *command])
    args.model = args.model_tag                   # as `vllm serve` does with its positional model
    engine = vllm.AsyncEngineArgs.from_cli_args(args)
    assert engine.attention_backend == "HYBRIDKV"
    gpu = name == "gpu"
    kind = "cuda" if gpu else "cpu"
    monkeypatch.setattr(vllm.platforms, "current_platform",
                        SimpleNamespace(is_cpu=lambda: not gpu, is_cuda=lambda: gpu, device_name=kind), raising=False)
    # what vLLM makes of an absent flag: prefix caching on, CUDA's default block size (the CPU platform sets 128)
    block_size = engine.block_size or (CacheConfig.DEFAULT_BLOCK_SIZE if gpu else 128)
    config = SimpleNamespace(
        use_v2_model_runner=env(c).get("VLLM_USE_V2_MODEL_RUNNER", {}).get("value", "1") != "0",
        speculative_config=engine.speculative_config, kv_transfer_config=engine.kv_transfer_config,
        cache_config=SimpleNamespace(enable_prefix_caching=engine.enable_prefix_caching is not False,
                                     cache_dtype=engine.kv_cache_dtype, block_size=block_size),
        scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=engine.disable_hybrid_kv_cache_manager),
        parallel_config=SimpleNamespace(decode_context_parallel_size=engine.decode_context_parallel_size,
                                        prefill_context_parallel_size=engine.prefill_context_parallel_size,
                                        enable_dbo=engine.enable_dbo))
    hybridkv = additional_config(c)["hybridkv"]
    kv_ops = runtime.resolve_kv_ops(HybridKVConfig(**{k: v for k, v in hybridkv.items() if k == "kv_ops"},
                                                   profile=hybridkv["profile"]))
    runtime._check_flags(config, kv_ops)                    # raises ConfigError naming the flag to change


def test_cpu_demo_carries_the_shipped_profile_of_its_model():
    """The cpu-demo overlay serves the embedded model, whose profile ships with the project: its ConfigMap holds
    that profile, byte for byte (a re-made shipped profile must be copied here too)."""
    shipped = (ROOT / "configs/profiles/smollm2-vl.json").read_text()
    (cm,) = [c for c in by_kind(render("overlays/cpu-demo"), "ConfigMap")
             if c["metadata"]["name"].startswith("hybridkv-profile")]
    assert cm["data"]["profile.json"] == shipped


def test_plugin_metrics_need_no_multiproc_dir_setting(overlay):
    """The plugin's metrics reach /metrics with nothing set here: in `vllm serve` the plugin turns Prometheus
    multiprocess mode on itself, in a fresh temporary directory per server process that vLLM removes at exit
    (hybridkv_vllm/adapter/plugin.py; tests/engine/test_metrics_plain_serve.py runs the README's plain command).
    A PROMETHEUS_MULTIPROC_DIR set in the pod would instead point at a volume that outlives the container (an
    emptyDir lives as long as the pod): after a container restart the dead processes' files would still be read,
    their counters summed into the new ones. The temporary directory needs a writable temp dir: with a read-only
    root filesystem, $TMPDIR (default /tmp) must be a writable mount."""
    _, objs = overlay
    c = container(objs)
    assert c["command"] == ["vllm", "serve"], "the plugin switches the mode for the `vllm serve` process"
    assert not {"PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"} & set(env(c))
    if (c.get("securityContext") or {}).get("readOnlyRootFilesystem"):
        tmp = env(c).get("TMPDIR", {}).get("value", "/tmp").rstrip("/")
        assert any(tmp == vm["mountPath"].rstrip("/") and not vm.get("readOnly") for vm in c["volumeMounts"]), (
            f"read-only root filesystem and no writable volume at {tmp}: the plugin cannot share its metrics")

# --- probes, shm, cache, resources ------------------------------------------------------------------------------

def test_probes_hit_health_on_the_serving_port(overlay):
    _, objs = overlay
    c = container(objs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(probe)
        assert p, f"{probe} missing"
        get = p["httpGet"]
        assert get["path"] == "/health", probe
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port == 8000, probe
    s = c["startupProbe"]
    # model download + load + compile: at least 10 minutes before the liveness probe may kill the pod
    assert s["failureThreshold"] * s.get("periodSeconds", 10) >= 600
    lv = c["livenessProbe"]
    assert lv["failureThreshold"] * lv.get("periodSeconds", 10) >= 30
    assert lv.get("timeoutSeconds", 1) >= 5, "/health can be slow under load: a 1 s liveness timeout kills pods"


def test_dev_shm_is_a_memory_emptydir(overlay):
    _, objs = overlay
    c = container(objs)
    vols = {v["name"]: v for v in pod_spec(objs)["volumes"]}
    shm = [vm for vm in c["volumeMounts"] if vm["mountPath"] == "/dev/shm"]
    assert len(shm) == 1
    ed = vols[shm[0]["name"]].get("emptyDir")
    assert ed and ed.get("medium") == "Memory" and ed.get("sizeLimit")


def test_model_cache_volume_holds_hf_home(overlay):
    _, objs = overlay
    c = container(objs)
    hf_home = env(c)["HF_HOME"]["value"]
    vols = {v["name"]: v for v in pod_spec(objs)["volumes"]}
    mounts = [vm for vm in c["volumeMounts"] if hf_home == vm["mountPath"] or hf_home.startswith(
        vm["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, f"HF_HOME={hf_home} is not on a mounted volume"
    pvc = vols[mounts[0]["name"]].get("persistentVolumeClaim")
    assert pvc, "the model cache is a PersistentVolumeClaim"
    assert pvc["claimName"] in {p["metadata"]["name"] for p in by_kind(objs, "PersistentVolumeClaim")}


def test_resources_requests_and_limits(overlay):
    name, objs = overlay
    r = container(objs)["resources"]
    for k in ("cpu", "memory"):
        assert k in r["requests"] and k in r["limits"], k
    if name == "gpu":
        assert r["requests"].get(GPU) == r["limits"].get(GPU) == "1"
    else:
        assert GPU not in r["requests"] and GPU not in r["limits"]
    # extended resources (GPUs) cannot be overcommitted: requests must equal limits
    for k in set(r["requests"]) | set(r["limits"]):
        if "/" in k:
            assert r["requests"].get(k) == r["limits"].get(k), k


def test_gpu_overlay_schedules_on_gpu_nodes():
    objs = render("overlays/gpu")
    spec = pod_spec(objs)
    assert spec.get("runtimeClassName") == "nvidia"
    assert any(t.get("key") == GPU for t in spec.get("tolerations", []))
    token = env(container(objs)).get("HF_TOKEN")
    assert token and token["valueFrom"]["secretKeyRef"]["key"] == "token", "HF token comes from a Secret"


def test_cpu_demo_runs_the_embedded_model_offline():
    c = container(render("overlays/cpu-demo"))
    e = env(c)
    assert expand(c["args"][0], c) == "/opt/hybridkv/models/smollm2-vl"
    assert e["HF_HUB_OFFLINE"]["value"] == "1"
    assert c["image"].endswith("-cpu-demo")


def test_image_is_pinned(overlay):
    _, objs = overlay
    image = container(objs)["image"]
    name, _, digest = image.partition("@")
    repo, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "")
    assert "/" in repo, f"image {image} has no registry/repository"
    assert tag or digest, f"image {image} is not pinned"
    assert tag != "latest", f"image {image} uses :latest"
    assert container(objs).get("imagePullPolicy") in ("IfNotPresent", None)


def test_runs_as_the_images_non_root_user(overlay):
    _, objs = overlay
    sc = pod_spec(objs)["securityContext"]
    assert sc["runAsNonRoot"] is True
    uid = re.search(r"ARG HYBRIDKV_UID=(\d+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert str(sc["runAsUser"]) == uid
    csc = container(objs)["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]


# --- wiring ---------------------------------------------------------------------------------------------------

def test_selectors_match_labels(overlay):
    _, objs = overlay
    dep = one(objs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(dep["spec"]["selector"]["matchLabels"], pod_labels)
    svc = one(objs, "Service")
    assert svc["spec"]["selector"] and selector_matches(svc["spec"]["selector"], pod_labels)
    pdb = one(objs, "PodDisruptionBudget")
    assert selector_matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"].get("maxUnavailable") or pdb["spec"].get("minAvailable")


def test_service_targets_the_container_port(overlay):
    _, objs = overlay
    c = container(objs)
    names = {p["name"] for p in c["ports"]}
    for p in one(objs, "Service")["spec"]["ports"]:
        tp = p["targetPort"]
        assert (tp in names) if isinstance(tp, str) else tp in {q["containerPort"] for q in c["ports"]}


def test_servicemonitor_selects_the_service_and_its_port(overlay):
    _, objs = overlay
    svc, sm = one(objs, "Service"), one(objs, "ServiceMonitor")
    assert selector_matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert sm["metadata"].get("namespace") == svc["metadata"].get("namespace") or sm["spec"].get(
        "namespaceSelector")
    ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in ports and ep.get("path", "/metrics") == "/metrics"


def test_scaledobject_targets_the_deployment_on_queue_depth(overlay):
    _, objs = overlay
    so, dep = one(objs, "ScaledObject"), one(objs, "Deployment")
    ref = so["spec"]["scaleTargetRef"]
    assert ref["name"] == dep["metadata"]["name"] and ref.get("kind", "Deployment") == "Deployment"
    assert so["metadata"].get("namespace") == dep["metadata"].get("namespace")
    assert so["spec"]["minReplicaCount"] >= 1, "scale-to-zero would make the first request wait for a model load"
    assert so["spec"]["maxReplicaCount"] >= so["spec"]["minReplicaCount"]
    served = expand("$(SERVED_MODEL_NAME)", container(objs))
    for trig in so["spec"]["triggers"]:
        assert trig["type"] == "prometheus"
        q = trig["metadata"]["query"]
        assert "vllm:num_requests_waiting" in q
        assert f'model_name="{served}"' in q, f"the query must select this overlay's served model: {q}"
        assert metric_names(q) <= known_metric_names(), q


def test_everything_lands_in_the_overlay_namespace(overlay):
    name, objs = overlay
    namespaces = {o["metadata"].get("namespace") for o in objs}
    assert len(namespaces) == 1 and None not in namespaces, namespaces


def test_dashboard_configmap_has_the_sidecar_label():
    cms = render("grafana")
    assert len(cms) == 1 and cms[0]["kind"] == "ConfigMap"
    cm = cms[0]
    assert cm["metadata"]["labels"].get("grafana_dashboard") == "1"
    (fname, body), = cm["data"].items()
    assert fname.endswith(".json")
    assert json.loads(body)["uid"] == "hybridkv-vllm"


def test_additional_config_is_accepted_by_the_plugins_parser(overlay, tmp_path):
    """The rendered --additional-config goes through the adapter's own validation (keys, types, ranges), with the
    profile path pointed at the ConfigMap's content written to disk."""
    from hybridkv_vllm.adapter.config import parse_config

    _, objs = overlay
    cfg = additional_config(container(objs))
    (cm,) = [c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].startswith("hybridkv-profile")]
    f = tmp_path / "profile.json"
    f.write_text(cm["data"]["profile.json"])
    cfg["hybridkv"]["profile"] = str(f)
    parsed = parse_config(cfg)
    assert 0 < parsed.budget <= 1


@pytest.mark.parametrize("where", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_committed_profile_is_a_real_profile_or_a_loud_placeholder(where):
    """deploy/README.md step 2: the operator puts `hybridkv profile` output here. Until then the placeholder must
    be refused by the plugin's loader (the pod crash-loops with a clear error instead of serving uncompressed)."""
    from hybridkv_vllm.core.errors import ProfileError
    from hybridkv_vllm.core.profile import HeadProfile

    path = ROOT / "deploy" / where / "profile.json"
    doc = json.loads(path.read_text())
    if "_placeholder" in doc:
        with pytest.raises(ProfileError):
            HeadProfile.load(path)
    else:
        HeadProfile.load(path)
