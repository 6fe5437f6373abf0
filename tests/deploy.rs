//! The deployment files, validated with what installs from the registries
//! (no Docker engine or cluster runs here): the Compose file against the
//! Compose specification's JSON schema, the Kubernetes manifests against
//! Kubernetes' schemas, KEDA's objects against the transcribed CRD subset,
//! the Dockerfiles with hadolint, and promtool on the Compose scrape config.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is missing ({e}): scripts/test installs it"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compose_file_matches_the_compose_specification() {
    run(
        "check-jsonschema",
        &[
            "--builtin-schema",
            "vendor.compose-spec",
            "docker-compose.yml",
        ],
    );
}

#[test]
fn kubernetes_manifests_are_valid() {
    let core = [
        "namespace.yaml",
        "configmap.yaml",
        "secret.example.yaml",
        "models-pvc.yaml",
        "migrate-job.yaml",
        "gateway.yaml",
        "router.yaml",
        "worker-compact.yaml",
        "worker-large.yaml",
        "pdb.yaml",
        "networkpolicy.yaml",
    ];
    let paths: Vec<String> = core.iter().map(|f| format!("deploy/k8s/{f}")).collect();
    let mut args = vec!["--strict", "--quiet", "-k", "1.30.0"];
    args.extend(paths.iter().map(String::as_str));
    run("kubernetes-validate", &args);
    // Every file the kustomization names exists, and every manifest is named.
    let k = std::fs::read_to_string(root().join("deploy/k8s/kustomization.yaml")).unwrap();
    // The kustomization's resources: its list items, comments aside.
    let resources: Vec<&str> = k
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .collect();
    for f in core
        .iter()
        .filter(|f| **f != "secret.example.yaml")
        .chain(["keda.yaml", "servicemonitor.yaml"].iter())
    {
        assert!(resources.contains(f), "kustomization.yaml misses {f}");
    }
    // Placeholder Secrets are never applied by `kubectl apply -k`.
    assert!(
        !resources.contains(&"secret.example.yaml"),
        "the example Secret is not deployed"
    );
    // Every pod runs with the runtime's seccomp profile and no service-account token.
    for f in [
        "gateway.yaml",
        "router.yaml",
        "worker-compact.yaml",
        "worker-large.yaml",
        "migrate-job.yaml",
    ] {
        let text = std::fs::read_to_string(root().join("deploy/k8s").join(f)).unwrap();
        assert!(text.contains("RuntimeDefault"), "{f}: seccompProfile");
        assert!(
            text.contains("automountServiceAccountToken"),
            "{f}: service-account token"
        );
    }
    // The large tier asks for a GPU and tolerates GPU nodes; every worker's
    // grace period outlasts the longest job (worker.job_deadline_s = 900).
    let large = std::fs::read_to_string(root().join("deploy/k8s/worker-large.yaml")).unwrap();
    assert!(large.contains("nvidia.com/gpu") && large.contains("tolerations"));
    for f in ["worker-compact.yaml", "worker-large.yaml"] {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root().join("deploy/k8s").join(f)).unwrap(),
        )
        .unwrap();
        let grace = v["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap();
        assert!(grace > 900, "{f}: grace {grace}");
    }
}

#[test]
fn keda_objects_match_the_crd_schema() {
    let text = std::fs::read_to_string(root().join("deploy/k8s/keda.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let docs: Vec<&str> = text.split("\n---\n").collect();
    assert_eq!(
        docs.len(),
        3,
        "a TriggerAuthentication and a ScaledObject per tier"
    );
    for (i, doc) in docs.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(doc).unwrap();
        if v["kind"] == "ScaledObject" {
            let q = v["spec"]["triggers"][0]["metadata"]["queueName"]
                .as_str()
                .unwrap();
            assert!(q == "recap.compact" || q == "recap.large", "{q}");
        }
        let p = dir.path().join(format!("doc{i}.json"));
        std::fs::write(&p, doc).unwrap();
        run(
            "check-jsonschema",
            &[
                "--schemafile",
                "deploy/k8s/schemas/keda-scaledobject.schema.json",
                p.to_str().unwrap(),
            ],
        );
    }
}

#[test]
fn dockerfiles_pass_hadolint() {
    run("hadolint", &["docker/Dockerfile", "docker/Dockerfile.cuda"]);
    for f in ["docker/Dockerfile", "docker/Dockerfile.cuda"] {
        let d = std::fs::read_to_string(root().join(f)).unwrap();
        assert!(d.contains("USER 10001"), "{f} runs as non-root");
        assert!(d.matches("FROM ").count() >= 2, "{f} is multi-stage");
        assert!(
            !d.contains("COPY models") && d.contains("RECAP_MODELS_DIR=/models"),
            "{f}: models are mounted, not baked in"
        );
    }
}
