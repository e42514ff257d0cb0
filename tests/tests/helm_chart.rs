//! The Helm chart (`helm/blockmirror`), checked offline and against the real
//! daemon.
//!
//! `helm/test/helm_check.py` (in a Python venv with the packages pinned in
//! `helm/test/requirements.txt`; `.ci/run` creates it) lints the chart
//! strictly, runs yamllint, renders it with the default values and with
//! `helm/test/values-full.yaml` (every optional feature on), validates every
//! rendered manifest against the Kubernetes 1.31 schemas (strict; the
//! ServiceMonitor CRD alone is skipped) and checks that each file in
//! `helm/test/bad-values/` is refused. It prints the rendered objects as JSON;
//! the assertions about their content are here.
//!
//! The second test renders the chart with paths in a temporary directory and
//! free loopback ports, runs the real `blockmirrord` with exactly the
//! container's command, args and environment (downward-API fields filled in
//! and `$(VAR)` references expanded as the kubelet does), then runs the
//! probes as the kubelet would (the exec probe's `mirrorctl` command; a
//! grpc.health.v1 Check on the gRPC probe's port), reaches the daemon from the
//! CSI sidecar's environment, scrapes the metrics port, sees spans arrive
//! under the chart's service name, and stops the daemon with SIGTERM within
//! the pod's terminationGracePeriodSeconds. A flag the chart invents, or a
//! path it gets wrong, fails here.
//!
//! Without the venv the tests fail (they are never skipped) and name the
//! command that creates it.

use blockmirror_tests::binary;
use blockmirror_tests::otlp::Receiver;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Where the venv is unless `BLOCKMIRROR_HELM_VENV` says otherwise (the same
/// rule as `.ci/run`).
const VENV_VAR: &str = "BLOCKMIRROR_HELM_VENV";
const VENV_DEFAULT: &str = ".cache/blockmirror/helm-venv";
/// How long the daemon may take to bind its listeners.
const START_DEADLINE: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// The venv's Python; panics with the command that creates the venv.
fn venv_python() -> PathBuf {
    let venv = std::env::var_os(VENV_VAR).map_or_else(
        || {
            let home = std::env::var_os("HOME").expect("HOME (or set BLOCKMIRROR_HELM_VENV)");
            Path::new(&home).join(VENV_DEFAULT)
        },
        PathBuf::from,
    );
    let python = venv.join("bin").join("python");
    assert!(
        python.exists(),
        "the Helm chart check needs a Python venv at {v} ({VENV_VAR}, default ~/{VENV_DEFAULT}); \
         `bash .ci/run` creates it, or by hand, from the repository root:\n  python3 -m venv {v} && \
         {v}/bin/pip install -r helm/test/requirements.txt",
        v = venv.display()
    );
    python
}

/// Runs `helm_check.py ARGS`; panics with its findings unless it succeeds.
fn helm_check(args: &[OsString]) -> Value {
    let script = repo().join("helm").join("test").join("helm_check.py");
    let out = Command::new(venv_python())
        .arg(&script)
        .args(args)
        .output()
        .expect("run helm_check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "helm_check.py printed no JSON ({e}); status {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        )
    });
    assert!(
        out.status.success(),
        "helm_check.py failed ({}):\n{}\nstderr:\n{stderr}",
        out.status,
        serde_json::to_string_pretty(&failures_of(&report)).unwrap_or_default()
    );
    report
}

/// The `failures` lists anywhere in a report.
fn failures_of(report: &Value) -> Vec<Value> {
    match report {
        Value::Array(sets) => sets.iter().flat_map(failures_of).collect(),
        Value::Object(o) => o
            .get("failures")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        _ => vec![],
    }
}

#[track_caller]
fn at<'a>(v: &'a Value, pointer: &str) -> &'a Value {
    v.pointer(pointer)
        .unwrap_or_else(|| panic!("{pointer} is missing in:\n{v:#}"))
}

#[track_caller]
fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    at(v, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string: {}", at(v, pointer)))
}

#[track_caller]
fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap_or_else(|| panic!("not a string: {s}")))
        .collect()
}

/// The element of the list at `pointer` whose `name` is `name`.
#[track_caller]
fn named<'a>(v: &'a Value, pointer: &str, name: &str) -> &'a Value {
    at(v, pointer)
        .as_array()
        .unwrap_or_else(|| panic!("{pointer} is not a list"))
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name:?} in {pointer}: {}", at(v, pointer)))
}

fn names(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(|e| e["name"].as_str()).collect())
        .unwrap_or_default()
}

/// A container's plain `value` environment variables (valueFrom ones: None).
fn env_values(container: &Value) -> HashMap<&str, Option<&str>> {
    container["env"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| (e["name"].as_str().unwrap_or(""), e["value"].as_str()))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts the pod mounts host path `host` at the same path in `container`,
/// through the volume called `volume`; returns the hostPath type.
#[track_caller]
fn assert_host_mount<'a>(pod: &'a Value, container: &Value, volume: &str, host: &str) -> &'a str {
    let vol = named(pod, "/volumes", volume);
    assert_eq!(str_at(vol, "/hostPath/path"), host, "volume {volume}");
    let mount = named(container, "/volumeMounts", volume);
    assert_eq!(str_at(mount, "/mountPath"), host, "mount of {volume}");
    str_at(vol, "/hostPath/type")
}

#[test]
fn chart_lints_validates_and_renders_what_the_values_say() {
    let report = helm_check(&["check".into()]);
    assert!(failures_of(&report).is_empty());

    // The checks ran (a check script that checks nothing fails here).
    let checked = strings(&report["checked"]);
    for must in [
        "pinned package versions",
        "lint --strict default",
        "lint --strict full",
        "yamllint blockmirror/values.yaml",
        "yamllint rendered default",
        "yamllint rendered full",
        "kubernetes-validate --strict -k 1.31.0 default: DaemonSet/bm-blockmirror",
        "kubernetes-validate --strict -k 1.31.0 default: Service/bm-blockmirror-metrics",
        "kubernetes-validate --strict -k 1.31.0 default: ServiceAccount/bm-blockmirror",
        "kubernetes-validate --strict -k 1.31.0 full: DaemonSet/bm-blockmirror",
        "kubernetes-validate --strict -k 1.31.0 full: Service/bm-blockmirror-metrics",
        "kubernetes-validate --strict -k 1.31.0 full: ServiceAccount/bm-daemon",
    ] {
        assert!(
            checked.contains(&must),
            "not checked: {must}; checked: {checked:#?}"
        );
    }
    // Only the ServiceMonitor (a CRD) goes unvalidated.
    assert_eq!(
        strings(&report["skipped_validation"]),
        ["full: ServiceMonitor/bm-blockmirror (CRD: no bundled schema)"]
    );
    // Lint found nothing worse than "info".
    for set in ["default", "full"] {
        for m in report["lint"][set]["messages"]
            .as_array()
            .expect("lint messages")
        {
            assert!(m["severity"].as_i64() < Some(2), "{set}: {m}");
        }
    }

    // Wrong values are refused, by the schema (and lint) or by the templates.
    let bad = report["bad_values"].as_array().expect("bad_values");
    let stage = |file: &str| -> &str {
        let e = bad
            .iter()
            .find(|e| e["file"] == file)
            .unwrap_or_else(|| panic!("bad-values/{file} was not tried"));
        assert_eq!(e["render_rejected"], true, "{e}");
        if e["stage"] == "schema" {
            assert_eq!(e["lint_rejected"], true, "{e}");
        }
        e["stage"].as_str().expect("stage")
    };
    assert_eq!(stage("port-as-string.yaml"), "schema");
    assert_eq!(stage("port-out-of-range.yaml"), "schema");
    assert_eq!(stage("relative-state-dir.yaml"), "schema");
    assert_eq!(stage("unknown-key.yaml"), "schema");
    assert_eq!(stage("grpc-probe-without-tcp.yaml"), "template");
    assert_eq!(stage("grace-too-short.yaml"), "template");
    assert_eq!(stage("port-clash.yaml"), "template");
    assert_eq!(stage("otlp-https.yaml"), "schema");
    assert!(bad.iter().all(|e| e["render_rejected"] == true));
    let port = bad
        .iter()
        .find(|e| e["file"] == "port-as-string.yaml")
        .expect("port-as-string");
    assert!(
        str_at(port, "/schema_error").contains("/metrics/port': got string, want integer"),
        "{port}"
    );

    check_default_render(&report["renders"]["default"]);
    check_full_render(&report["renders"]["full"]);
}

/// The default values: what a plain `helm install` gets.
fn check_default_render(objects: &Value) {
    let mut kinds: Vec<&str> = objects
        .as_object()
        .expect("objects")
        .keys()
        .map(String::as_str)
        .collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["DaemonSet", "NOTES", "Service", "ServiceAccount"]);

    let ds = &objects["DaemonSet"];
    assert_eq!(str_at(ds, "/metadata/namespace"), "storage");
    for (k, v) in [
        ("app.kubernetes.io/name", "blockmirror"),
        ("app.kubernetes.io/instance", "bm"),
        ("app.kubernetes.io/version", "0.1.0"),
        ("app.kubernetes.io/managed-by", "Helm"),
        ("helm.sh/chart", "blockmirror-0.1.0"),
    ] {
        assert_eq!(ds["metadata"]["labels"][k], v, "label {k}");
        assert_eq!(
            ds["spec"]["template"]["metadata"]["labels"][k], v,
            "pod label {k}"
        );
    }
    assert_eq!(
        at(ds, "/spec/selector/matchLabels"),
        &json!({"app.kubernetes.io/name": "blockmirror", "app.kubernetes.io/instance": "bm"})
    );
    assert_eq!(str_at(ds, "/spec/updateStrategy/type"), "OnDelete");
    let pod = at(ds, "/spec/template/spec");
    assert_eq!(str_at(pod, "/priorityClassName"), "system-node-critical");
    assert_eq!(str_at(pod, "/nodeSelector/kubernetes.io~1os"), "linux");
    assert_eq!(pod.get("hostNetwork"), None);
    assert_eq!(pod["serviceAccountName"], "bm-blockmirror");
    assert_eq!(pod["automountServiceAccountToken"], false);
    // Both shutdown waits of 20 s fit in the grace period.
    assert_eq!(pod["terminationGracePeriodSeconds"], 55);
    assert_eq!(names(&pod["containers"]), ["blockmirrord"]);

    let c = named(pod, "/containers", "blockmirrord");
    assert_eq!(str_at(c, "/image"), "ghcr.io/blockmirror/blockmirror:0.1.0");
    assert_eq!(strings(&c["command"]), ["blockmirrord"]);
    assert_eq!(
        strings(&c["args"]),
        [
            "--state-dir=/var/lib/blockmirror",
            "--listen=unix:/run/blockmirror/blockmirror.sock",
            "--nbd-listen=unix:/run/blockmirror/nbd.sock",
            "--metrics-listen=0.0.0.0:9464",
            "--log=info",
            "--shutdown-grace-secs=20",
            "--trace-write-sample-ratio=0.01",
            "--trace-slow-write-ms=50",
        ]
    );
    assert_eq!(
        assert_host_mount(pod, c, "state", "/var/lib/blockmirror"),
        "DirectoryOrCreate"
    );
    assert_eq!(
        assert_host_mount(pod, c, "sockets", "/run/blockmirror"),
        "DirectoryOrCreate"
    );
    assert_eq!(assert_host_mount(pod, c, "dev", "/dev"), "Directory");
    assert_eq!(c["securityContext"]["privileged"], true);
    assert_eq!(
        c["ports"],
        json!([{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}])
    );

    // Exec probes over the unix socket, no TCP listener.
    for (probe, period, failures) in [
        ("startupProbe", 5, 60),
        ("readinessProbe", 10, 3),
        ("livenessProbe", 20, 6),
    ] {
        let p = &c[probe];
        assert_eq!(
            strings(at(p, "/exec/command")),
            [
                "mirrorctl",
                "--socket",
                "/run/blockmirror/blockmirror.sock",
                "volume",
                "list"
            ],
            "{probe}"
        );
        assert_eq!(p.get("grpc"), None, "{probe}");
        assert_eq!(p["periodSeconds"], period, "{probe}");
        assert_eq!(p["failureThreshold"], failures, "{probe}");
        assert_eq!(p["timeoutSeconds"], 5, "{probe}");
    }

    // Telemetry: no exporter or sampler variables unless set; the pod's
    // identity from the downward API, defined before it is referenced.
    let env = env_values(c);
    for absent in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
    ] {
        assert!(!env.contains_key(absent), "{absent} is set: {env:?}");
    }
    assert_eq!(env["OTEL_SERVICE_NAME"], Some("blockmirrord"));
    assert_eq!(
        env["BLOCKMIRROR_SOCKET"],
        Some("/run/blockmirror/blockmirror.sock")
    );
    assert_eq!(
        env["OTEL_RESOURCE_ATTRIBUTES"],
        Some(
            "k8s.pod.name=$(K8S_POD_NAME),k8s.pod.uid=$(K8S_POD_UID),k8s.node.name=$(K8S_NODE_NAME),\
             k8s.namespace.name=$(K8S_NAMESPACE_NAME),k8s.daemonset.name=bm-blockmirror"
        )
    );
    let order = names(&c["env"]);
    let pos = |n: &str| order.iter().position(|x| *x == n).unwrap_or(usize::MAX);
    for (var, field) in [
        ("K8S_POD_NAME", "metadata.name"),
        ("K8S_POD_UID", "metadata.uid"),
        ("K8S_NODE_NAME", "spec.nodeName"),
        ("K8S_NAMESPACE_NAME", "metadata.namespace"),
    ] {
        let e = named(c, "/env", var);
        assert_eq!(str_at(e, "/valueFrom/fieldRef/fieldPath"), field);
        assert!(
            pos(var) < pos("OTEL_RESOURCE_ATTRIBUTES"),
            "{var} after its use"
        );
    }

    // Prometheus: pod annotations and a headless Service on the same port.
    let ann = at(ds, "/spec/template/metadata/annotations");
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], "9464");
    let svc = &objects["Service"];
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(
        svc["spec"]["selector"],
        ds["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}])
    );
    let notes = objects["NOTES"].as_str().expect("NOTES");
    assert!(
        notes.contains("/run/blockmirror/blockmirror.sock"),
        "{notes}"
    );
    assert!(
        notes.contains("nbd+unix:///EXPORT?socket=/run/blockmirror/nbd.sock"),
        "{notes}"
    );
}

/// values-full.yaml: every optional feature on.
fn check_full_render(objects: &Value) {
    let ds = &objects["DaemonSet"];
    let pod = at(ds, "/spec/template/spec");
    assert_eq!(
        names(&pod["containers"]),
        ["blockmirrord", "csi-driver", "log-shipper"]
    );
    let c = named(pod, "/containers", "blockmirrord");
    assert_eq!(
        strings(&c["args"]),
        [
            "--state-dir=/srv/bm/state",
            "--listen=unix:/run/bm-sockets/api.sock",
            "--listen=tcp:0.0.0.0:9191",
            "--nbd-listen=unix:/run/bm-sockets/guests.sock",
            "--nbd-listen=tcp:[::]:10810",
            "--metrics-listen=0.0.0.0:9465",
            "--log=blockmirror_engine=debug,info",
            "--shutdown-grace-secs=7",
            "--trace-write-sample-ratio=0.5",
            "--trace-slow-write-ms=3600000",
            "--event-history=16384",
            "--heartbeat-secs=3",
        ]
    );
    assert_eq!(
        assert_host_mount(pod, c, "state", "/srv/bm/state"),
        "DirectoryOrCreate"
    );
    assert_eq!(
        assert_host_mount(pod, c, "sockets", "/run/bm-sockets"),
        "DirectoryOrCreate"
    );
    assert_eq!(assert_host_mount(pod, c, "dev", "/dev"), "Directory");
    assert_eq!(
        assert_host_mount(pod, c, "images", "/srv/images"),
        "Directory"
    );
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["priorityClassName"], "blockmirror-critical");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(pod["imagePullSecrets"], json!([{"name": "regcred"}]));
    assert_eq!(str_at(ds, "/spec/updateStrategy/type"), "RollingUpdate");

    // gRPC probes on the TCP listener.
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            c[probe]["grpc"],
            json!({"port": 9191, "service": "blockmirror.v1.VolumeService"}),
            "{probe}"
        );
        assert_eq!(c[probe].get("exec"), None, "{probe}");
    }
    assert_eq!(c["startupProbe"]["periodSeconds"], 2);
    assert_eq!(c["startupProbe"]["failureThreshold"], 90);

    let env = env_values(c);
    assert_eq!(
        env["OTEL_EXPORTER_OTLP_ENDPOINT"],
        Some("http://otel-collector.observability:4317")
    );
    assert_eq!(env["OTEL_SERVICE_NAME"], Some("blockmirrord-full"));
    assert_eq!(env["OTEL_TRACES_SAMPLER"], Some("parentbased_traceidratio"));
    assert_eq!(env["OTEL_TRACES_SAMPLER_ARG"], Some("0.25"));
    assert!(
        env["OTEL_RESOURCE_ATTRIBUTES"]
            .is_some_and(|a| a.ends_with(",deployment.environment=test,k8s.cluster.name=lab")),
        "{env:?}"
    );
    assert_eq!(
        str_at(
            named(c, "/env", "OTEL_EXPORTER_OTLP_HEADERS"),
            "/valueFrom/secretKeyRef/name"
        ),
        "otlp-auth"
    );

    // The CSI sidecar sees the same socket directory, and is told the socket.
    let csi = named(pod, "/containers", "csi-driver");
    assert_eq!(
        str_at(csi, "/image"),
        "registry.example/csi-blockmirror:1.2.3"
    );
    assert_eq!(
        assert_host_mount(pod, csi, "sockets", "/run/bm-sockets"),
        "DirectoryOrCreate"
    );
    assert_eq!(
        env_values(csi)["BLOCKMIRROR_SOCKET"],
        Some("/run/bm-sockets/api.sock")
    );
    assert_eq!(
        str_at(named(csi, "/volumeMounts", "csi-plugin"), "/mountPath"),
        "/csi"
    );
    assert_eq!(
        strings(&csi["args"]),
        [
            "--blockmirror=$(BLOCKMIRROR_SOCKET)",
            "--csi-endpoint=unix:///csi/csi.sock"
        ]
    );
    assert!(
        named(csi, "/volumeMounts", "sockets")
            .get("readOnly")
            .is_none(),
        "a client needs write access to connect to a unix socket"
    );

    // Metrics: Service and ServiceMonitor on the metrics port.
    let svc = &objects["Service"];
    assert_eq!(svc["spec"]["ports"][0]["port"], 9465);
    let sm = &objects["ServiceMonitor"];
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"],
        svc["spec"]["selector"]
    );
    for (k, v) in sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(
            &svc["metadata"]["labels"][k], v,
            "the Service lacks label {k}"
        );
    }
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["interval"], "15s");
    assert_eq!(
        objects["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]["example.com/team"],
        "storage"
    );
    assert_eq!(objects["ServiceAccount"]["metadata"]["name"], "bm-daemon");
}

/// Free loopback TCP ports (all bound at once, so they differ).
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<_> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("local addr").port())
}

/// Expands `$(VAR)` references to variables defined earlier, as the kubelet
/// does in `env` values, `command` and `args` (`$$` is a literal `$`;
/// unknown references stay as they are).
fn expand(s: &str, defined: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = tail.strip_prefix("$(").and_then(|t| t.split_once(')'))
        {
            match defined.iter().rev().find(|(n, _)| n == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&tail[..name.len() + 3]),
            }
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The downward-API fields the test pod has.
const POD_FIELDS: [(&str, &str); 4] = [
    ("metadata.name", "bm-blockmirror-x7k2p"),
    ("metadata.uid", "2c9f0e0c-8a1e-4d8e-9d7c-3b1f8e9a6d01"),
    ("spec.nodeName", "node-1"),
    ("metadata.namespace", "storage"),
];

/// A container's environment as the kubelet would give it.
fn container_env(container: &Value) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("env name").to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &env)
        } else if let Some(field) = e.pointer("/valueFrom/fieldRef/fieldPath") {
            let field = field.as_str().expect("fieldPath");
            POD_FIELDS
                .iter()
                .find(|(f, _)| *f == field)
                .unwrap_or_else(|| panic!("env {name}: no test value for field {field}"))
                .1
                .to_owned()
        } else {
            panic!("env {name}: this test fills in only value and fieldRef: {e}");
        };
        env.push((name, value));
    }
    env
}

/// `command` + `args` of a container, `$(VAR)`-expanded, with the program
/// resolved to the binary cargo built.
fn container_command(container: &Value, env: &[(String, String)]) -> Command {
    let mut argv: Vec<String> = strings(&container["command"])
        .into_iter()
        .chain(strings(&container["args"]))
        .map(|a| expand(a, env))
        .collect();
    let program = argv.remove(0);
    command_in_image(&program, &argv, env)
}

/// `program` as the image has it (blockmirrord and mirrorctl on PATH), with
/// exactly `env`.
fn command_in_image(program: &str, args: &[String], env: &[(String, String)]) -> Command {
    assert!(
        program == "blockmirrord" || program == "mirrorctl",
        "{program}: the image provides blockmirrord and mirrorctl"
    );
    let mut cmd = Command::new(binary(program));
    cmd.args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// Where `path`, as `container` sees it, is on the host: through the
/// container's longest matching mount of a hostPath volume. Panics if the
/// container does not see `path` on a host path at all.
fn host_path(pod: &Value, container: &Value, path: &str) -> PathBuf {
    let path = Path::new(path);
    let mount = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| {
            m["mountPath"]
                .as_str()
                .is_some_and(|mp| path.starts_with(mp))
        })
        .max_by_key(|m| m["mountPath"].as_str().map_or(0, str::len))
        .unwrap_or_else(|| {
            panic!(
                "container {} does not mount {}: {}",
                container["name"],
                path.display(),
                container["volumeMounts"]
            )
        });
    let volume = named(pod, "/volumes", str_at(mount, "/name"));
    let rest = path
        .strip_prefix(str_at(mount, "/mountPath"))
        .expect("prefix");
    Path::new(str_at(volume, "/hostPath/path")).join(rest)
}

/// The daemon, killed on drop if still running.
#[derive(Debug)]
struct Daemon {
    child: Child,
    log: mpsc::Receiver<String>,
    lines: Vec<String>,
}

impl Daemon {
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn blockmirrord");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            log,
            lines: Vec::new(),
        }
    }

    /// Reads the log until `n` lines contain `what`.
    fn wait_for_log(&mut self, what: &str, n: usize) {
        let deadline = Instant::now() + START_DEADLINE;
        while self.lines.iter().filter(|l| l.contains(what)).count() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => self.lines.push(line),
                Err(_) => panic!(
                    "no {n} x {what:?} in blockmirrord's log within {START_DEADLINE:?}:\n{}",
                    self.lines.join("\n")
                ),
            }
        }
    }

    /// SIGTERM, as the kubelet sends; the exit status within `grace`.
    fn terminate(&mut self, grace: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for blockmirrord") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "blockmirrord still running {grace:?} after SIGTERM (the kubelet would SIGKILL it)"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The probe's exec command, run as the kubelet runs it: in the container's
/// environment, within timeoutSeconds.
fn run_exec_probe(probe: &Value, env: &[(String, String)]) {
    let argv = strings(at(probe, "/exec/command"));
    let timeout = Duration::from_secs(at(probe, "/timeoutSeconds").as_u64().expect("timeout"));
    let args: Vec<String> = argv[1..].iter().map(|a| (*a).to_owned()).collect();
    let started = Instant::now();
    let out = command_in_image(argv[0], &args, env)
        .output()
        .expect("run the exec probe");
    assert!(
        out.status.success(),
        "exec probe {argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < timeout,
        "exec probe took {:?}",
        started.elapsed()
    );
}

/// grpc.health.v1 Check on 127.0.0.1:`port`, as kubelet's gRPC probe does.
async fn grpc_probe(port: u16, service: &str) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("endpoint URL")
        .connect()
        .await
        .expect("connect to the gRPC probe port");
    let mut client = HealthClient::new(channel);
    let resp = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("grpc.health.v1.Health/Check");
    resp.into_inner().status()
}

/// The first bytes the server sends on an NBD connection.
fn nbd_greeting(mut stream: impl std::io::Read) -> [u8; 8] {
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic).expect("NBD greeting");
    magic
}

/// The pod spec of one rendered value set.
fn pod_of(set: &Value) -> &Value {
    at(set, "/objects/DaemonSet/spec/template/spec")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_args_run_the_real_daemon() {
    let tmp = tempfile::Builder::new()
        .prefix("bm-helm")
        .tempdir()
        .expect("tempdir");
    let state_dir = tmp.path().join("state");
    let socket_dir = tmp.path().join("run");
    let [grpc_port, nbd_port, metrics_port] = free_ports::<3>();
    let sink = Receiver::start("127.0.0.1:0").await.expect("OTLP receiver");

    // The same deployment twice, with exec probes and with gRPC probes.
    let base = json!({
        "paths": {"stateDir": state_dir, "socketDir": socket_dir},
        "grpc": {"tcp": {"enabled": true, "address": "127.0.0.1", "port": grpc_port}},
        "nbd": {"tcp": {"enabled": true, "address": "127.0.0.1", "port": nbd_port}},
        "metrics": {"address": "127.0.0.1", "port": metrics_port},
        "shutdownGraceSeconds": 2,
        "telemetry": {
            "serviceName": "blockmirrord-helm-test",
            "resourceAttributes": {"deployment.environment": "test"},
            "otlp": {"endpoint": sink.endpoint()},
            "traces": {"sampler": "always_on", "writeSampleRatio": 1, "slowWriteMs": 0},
        },
        "csiSidecar": {"enabled": true, "image": {"repository": "registry.example/csi"}},
        "extraArgs": ["--event-history=100"],
    });
    let mut grpc_mode = base.clone();
    grpc_mode["probes"] = json!({"mode": "grpc", "grpcService": "blockmirror.v1.JobService"});
    let values = tmp.path().join("values.json");
    std::fs::write(&values, json!([base, grpc_mode]).to_string()).expect("write values");
    let sets = helm_check(&["render".into(), values.into_os_string()]);
    let (exec_pod, grpc_pod) = (pod_of(&sets[0]), pod_of(&sets[1]));
    let daemon = named(exec_pod, "/containers", "blockmirrord");
    assert_eq!(
        daemon["args"],
        named(grpc_pod, "/containers", "blockmirrord")["args"],
        "the probe mode changes only the probes"
    );
    let grace = Duration::from_secs(
        exec_pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds"),
    );

    // Every path the daemon is given is on a host path, at the same path.
    let args = strings(&daemon["args"]);
    let paths: Vec<&str> = args
        .iter()
        .filter_map(|a| {
            a.strip_prefix("--state-dir=")
                .or_else(|| a.strip_prefix("--listen=unix:"))
                .or_else(|| a.strip_prefix("--nbd-listen=unix:"))
        })
        .collect();
    assert_eq!(paths.len(), 3, "{args:?}");
    for p in paths {
        assert_eq!(host_path(exec_pod, daemon, p), Path::new(p));
    }

    let env = container_env(daemon);
    let mut server = Daemon::start(container_command(daemon, &env));
    // One line per gRPC listener: the unix socket and the TCP port.
    server.wait_for_log("gRPC listening", 2);

    // The exec probes (startup, readiness, liveness), as the kubelet runs them.
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        run_exec_probe(&daemon[probe], &env);
    }
    // The gRPC probes, as the kubelet sends them.
    let c = named(grpc_pod, "/containers", "blockmirrord");
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let port = at(&c[probe], "/grpc/port").as_u64().expect("port");
        assert_eq!(port, u64::from(grpc_port));
        let service = c[probe]["grpc"]["service"].as_str().unwrap_or("");
        assert_eq!(service, "blockmirror.v1.JobService");
        assert_eq!(
            grpc_probe(grpc_port, service).await,
            ServingStatus::Serving,
            "{probe}"
        );
    }
    assert_eq!(grpc_probe(grpc_port, "").await, ServingStatus::Serving);

    // The CSI sidecar reaches the daemon with what it is given: the socket
    // path in its environment, through its own mounts.
    let csi = named(exec_pod, "/containers", "csi-driver");
    let mut sidecar_env = container_env(csi);
    for (name, value) in &mut sidecar_env {
        if name == "BLOCKMIRROR_SOCKET" {
            *value = host_path(exec_pod, csi, value).display().to_string();
        }
    }
    let out = command_in_image(
        "mirrorctl",
        &["volume", "create", "from-sidecar", "--size", "1M"].map(String::from),
        &sidecar_env,
    )
    .output()
    .expect("mirrorctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and the volume is in the state directory the chart named.
    assert!(state_dir.join("volumes").join("from-sidecar.raw").exists());

    // NBD answers on the socket in the socket directory and on TCP.
    let nbd_socket = socket_dir.join("nbd.sock");
    let greeting =
        nbd_greeting(std::os::unix::net::UnixStream::connect(&nbd_socket).expect("NBD socket"));
    assert_eq!(&greeting, b"NBDMAGIC");
    let tcp = std::net::TcpStream::connect(("127.0.0.1", nbd_port)).expect("NBD TCP");
    assert_eq!(&nbd_greeting(tcp), b"NBDMAGIC");

    // Prometheus metrics on the metrics port.
    let mut http = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).expect("metrics port");
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .expect("GET /metrics");
    let mut resp = String::new();
    http.read_to_string(&mut resp).expect("metrics response");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    // SIGTERM: a clean exit inside the pod's grace period, spans flushed.
    let status = server.terminate(grace);
    assert!(status.success(), "blockmirrord exited with {status}");
    let spans = sink.spans();
    let served = spans
        .iter()
        .find(|s| s.name == "blockmirror.v1.VolumeService/CreateVolume" && s.kind == 2)
        .unwrap_or_else(|| panic!("no CreateVolume server span among {spans:#?}"));
    assert_eq!(served.service, "blockmirrord-helm-test");
    assert!(
        !spans.iter().any(|s| s.name.starts_with("grpc.health")),
        "health checks are not traced"
    );
}
