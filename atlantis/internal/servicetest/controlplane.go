package servicetest

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// ControlPlane is a real Kubernetes control plane on loopback (etcd, kube-apiserver and
// kube-controller-manager, as the Python tests run it: tests/support/controlplane.py, from
// the binaries hack/build-control-plane.sh builds), with the LockPolicy and LockMigration
// CRDs applied; stopped when the test ends.
type ControlPlane struct {
	// Kubeconfig is the path of an admin kubeconfig of the control plane.
	Kubeconfig string
	kubectl    string
}

// controlPlaneStart bounds the control plane's start (seconds when the machine is quiet).
const controlPlaneStart = 3 * time.Minute

// KubeControlPlane starts a control plane for the test.
func KubeControlPlane(t testing.TB) *ControlPlane {
	t.Helper()
	root := RepoRoot(t)
	python := filepath.Join(root, ".venv", "bin", "python")
	if _, err := os.Stat(python); err != nil {
		t.Fatalf("the repository's Python is not installed at %s: run `make venv` in the "+
			"repository", python)
	}
	env := append(os.Environ(), "PYTHONPATH="+root+string(os.PathListSeparator)+
		filepath.Join(root, "operator"))
	p := Start(t, "control-plane", env, python, "-m", "tests.support.controlplane", "up",
		"--workdir", t.TempDir())
	deadline := time.Now().Add(controlPlaneStart)
	var cp ControlPlane
	for cp.Kubeconfig == "" || cp.kubectl == "" {
		if p.Exited() || time.Now().After(deadline) {
			p.Stop()
			t.Fatalf("the Kubernetes control plane did not start within %v (its binaries are "+
				"built by hack/build-control-plane.sh):\n%s", controlPlaneStart, tail(p.Output(), 4000))
		}
		time.Sleep(100 * time.Millisecond)
		for _, line := range strings.Split(p.Output(), "\n") {
			if path, ok := strings.CutPrefix(line, "export KUBECONFIG="); ok {
				cp.Kubeconfig = path
			}
			if path, ok := strings.CutPrefix(line, "export PATH="); ok {
				bin, _, _ := strings.Cut(path, string(os.PathListSeparator))
				cp.kubectl = filepath.Join(bin, "kubectl")
			}
		}
	}
	cp.Kubectl(t, "", "apply", "--server-side", "-f", filepath.Join(root, "crds"))
	for _, crd := range []string{"lockpolicies.locking.runatlantis.io",
		"lockmigrations.locking.runatlantis.io"} {
		// Polled: `kubectl wait` fails on a CRD that has no conditions yet.
		for cp.Kubectl(t, "", "get", "crd", crd, "-o",
			`jsonpath={.status.conditions[?(@.type=="Established")].status}`) != "True" {
			if time.Now().After(deadline) {
				t.Fatalf("the CRD %s was not established within %v", crd, controlPlaneStart)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return &cp
}

// Kubectl runs kubectl against the control plane with stdin as its input; its output.
func (cp *ControlPlane) Kubectl(t testing.TB, stdin string, args ...string) string {
	t.Helper()
	cmd := exec.Command(cp.kubectl, args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+cp.Kubeconfig)
	cmd.Stdin = strings.NewReader(stdin)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return string(out)
}

// Apply applies each object (a manifest as JSON-able data) into namespace.
func (cp *ControlPlane) Apply(t testing.TB, namespace string, objects ...map[string]any) {
	t.Helper()
	for _, object := range objects {
		data, err := json.Marshal(object)
		if err != nil {
			t.Fatal(err)
		}
		cp.Kubectl(t, string(data), "apply", "-n", namespace, "-f", "-")
	}
}

// LockPolicy is the LockPolicy "default" (the one an operator applies unless told another)
// with spec.
func LockPolicy(spec map[string]any) map[string]any {
	return map[string]any{"apiVersion": "locking.runatlantis.io/v1alpha1", "kind": "LockPolicy",
		"metadata": map[string]any{"name": "default"}, "spec": spec}
}

// Operator starts `enhanced-locking operator` on a free loopback port with its own data dir,
// bound to the CRs of namespace (the LockPolicy "default", the LockMigration "to-enhanced"),
// and waits until it answers /readyz at all: 200, or 503 while it has not applied its
// LockPolicy (its start window) or a store does not answer.
func (cp *ControlPlane) Operator(t testing.TB, namespace string, args ...string) *Service {
	t.Helper()
	return launch(t, "", "operator", []string{"KUBECONFIG=" + cp.Kubeconfig},
		func(status int) bool {
			return status == http.StatusOK || status == http.StatusServiceUnavailable
		}, append([]string{"--namespace", namespace}, args...)...)
}

// WaitApplied waits until the operator's settings in force (GET /v1/config) are its
// LockPolicy's (layer "cluster").
func (s *Service) WaitApplied(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		if s.applied() {
			return
		}
		if s.Exited() || time.Now().After(deadline) {
			t.Fatalf("%s did not apply its LockPolicy within a minute:\n%s", s.Name,
				tail(s.Output(), 4000))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (s *Service) applied() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.URL+"/v1/config", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close() //nolint:errcheck
	var config struct {
		Layers []string `json:"layers"`
	}
	return resp.StatusCode == http.StatusOK && json.NewDecoder(resp.Body).Decode(&config) == nil &&
		slices.Contains(config.Layers, "cluster")
}
