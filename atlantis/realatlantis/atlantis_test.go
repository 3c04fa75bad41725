package realatlantis_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/runatlantis/atlantis/server/core/redis"
	"github.com/runatlantis/atlantis/server/events/command"
	"github.com/runatlantis/atlantis/server/events/models"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
	"github.com/runatlantis/enhanced-locking/atlantis/internal/servicetest"
)

// atlantisBinary is the Atlantis server binary: ENHANCED_LOCKING_ATLANTIS_BIN, or the one
// hack/build-atlantis.sh caches.
func atlantisBinary(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("ENHANCED_LOCKING_ATLANTIS_BIN")
	if bin == "" {
		script := filepath.Join(servicetest.RepoRoot(t), "hack", "build-atlantis.sh")
		out, err := exec.Command(script, "--print-bin").Output()
		if err != nil {
			t.Fatalf("%s --print-bin: %v", script, err)
		}
		bin = strings.TrimSpace(string(out))
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("the Atlantis binary is not built (%s): run `make atlantis` (hack/build-atlantis.sh)", bin)
	}
	return bin
}

// note is a comment Atlantis posted on a merge request.
type note struct {
	Path string
	Body string
}

// gitlab stands in for a GitLab server on loopback: the version call Atlantis makes at
// start, and merge-request comments, which it records.
type gitlab struct {
	URL   string
	mu    sync.Mutex
	notes []note
	other []string
}

func startGitLab(t *testing.T) *gitlab {
	t.Helper()
	g := &gitlab{}
	l, err := net.Listen("tcp", servicetest.Loopback+":0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.Method == http.MethodGet && r.URL.Path == "/api/v4/version":
			fmt.Fprint(w, `{"version":"17.0.0","revision":"loopback"}`)
		case r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/notes"):
			var body struct {
				Body string `json:"body"`
			}
			_ = json.NewDecoder(r.Body).Decode(&body)
			g.mu.Lock()
			g.notes = append(g.notes, note{Path: r.URL.EscapedPath(), Body: body.Body})
			g.mu.Unlock()
			w.WriteHeader(http.StatusCreated)
			fmt.Fprint(w, `{"id":1}`)
		default:
			g.mu.Lock()
			g.other = append(g.other, r.Method+" "+r.URL.String())
			g.mu.Unlock()
			http.NotFound(w, r)
		}
	})}
	go srv.Serve(l)                   //nolint:errcheck
	t.Cleanup(func() { srv.Close() }) //nolint:errcheck
	g.URL = "http://" + l.Addr().String()
	return g
}

func (g *gitlab) comments() []note {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]note(nil), g.notes...)
}

// startAtlantis runs `atlantis server` on loopback against redisAddr, with GitLab at g.
// Any HTTP(S) request it would send off the machine goes to a closed loopback proxy.
func startAtlantis(t *testing.T, bin, redisAddr string, g *gitlab) string {
	t.Helper()
	port := servicetest.FreePort(t)
	closed := servicetest.FreePort(t)
	host, redisPort, _ := net.SplitHostPort(redisAddr)
	home := t.TempDir()
	atlantisURL := fmt.Sprintf("http://%s:%d", servicetest.Loopback, port)
	deadProxy := fmt.Sprintf("http://%s:%d", servicetest.Loopback, closed)
	env := []string{"HOME=" + home, "PATH=" + os.Getenv("PATH"),
		"HTTP_PROXY=" + deadProxy, "HTTPS_PROXY=" + deadProxy, "NO_PROXY=127.0.0.1",
		"http_proxy=" + deadProxy, "https_proxy=" + deadProxy, "no_proxy=127.0.0.1"}
	servicetest.Start(t, "atlantis-"+strconv.Itoa(port), env, bin, "server",
		"--port", strconv.Itoa(port),
		"--atlantis-url", atlantisURL,
		"--data-dir", filepath.Join(home, "data"),
		"--repo-allowlist", "*", // every repository of the loopback GitLab
		"--gitlab-hostname", g.URL,
		"--gitlab-user", "atlantis",
		"--gitlab-token", "loopback-token",
		"--locking-db-type", "redis",
		"--redis-host", host,
		"--redis-port", redisPort,
		"--default-tf-version", "1.9.8",
		"--tf-download=false",
		"--tf-download-url", deadProxy,
		"--log-level", "debug",
	)
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(atlantisURL + "/healthz")
		if err == nil {
			resp.Body.Close() //nolint:errcheck
			if resp.StatusCode == http.StatusOK {
				return atlantisURL
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatal("Atlantis did not answer /healthz within 60s")
	return ""
}

func get(t *testing.T, u string) (int, string) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close() //nolint:errcheck
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

type apiLock struct {
	Name            string
	ProjectName     string
	ProjectRepo     string
	ProjectRepoPath string
	PullID          string
	PullURL         string
	User            string
	Workspace       string
	Time            time.Time
}

func atlantisLocks(t *testing.T, atlantisURL string) map[string]apiLock {
	t.Helper()
	status, body := get(t, atlantisURL+"/api/locks")
	if status != http.StatusOK {
		t.Fatalf("GET /api/locks: %d %s", status, body)
	}
	var result struct{ Locks []apiLock }
	if err := json.Unmarshal([]byte(body), &result); err != nil {
		t.Fatalf("GET /api/locks: %v: %s", err, body)
	}
	out := map[string]apiLock{}
	for _, l := range result.Locks {
		out[l.Name] = l
	}
	return out
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestTheServiceAndTheRealAtlantisShareOneLockSpace(t *testing.T) {
	bin := atlantisBinary(t)
	redisAddr := servicetest.Redis(t)
	svc := servicetest.Serve(t, servicetest.RedisArgs(redisAddr)...)
	g := startGitLab(t)
	atlantisURL := startAtlantis(t, bin, redisAddr, g)
	ctx := context.Background()
	c, err := client.New(svc.URL)
	must(t, err)
	gitlabHost := strings.TrimPrefix(g.URL, "http://")
	mrURL := func(repo string, num int) string { return fmt.Sprintf("%s/%s/-/merge_requests/%d", g.URL, repo, num) }
	// Atlantis's own Redis database code (what the binary runs) on the same Redis.
	host, port, _ := net.SplitHostPort(redisAddr)
	portNum, _ := strconv.Atoi(port)
	atlantisDB, err := redis.New(host, portNum, "", false, false, 0)
	must(t, err)
	defer atlantisDB.Close() //nolint:errcheck

	t.Run("a lock taken through the service is listed by Atlantis", func(t *testing.T) {
		lock, err := c.Acquire(ctx, client.AcquireRequest{
			Project:   client.Project{RepoFullName: "acme/infra", Path: "envs/prod/", ProjectName: "prod"},
			Workspace: "default",
			Pull: client.Pull{Num: 12, URL: mrURL("acme/infra", 12), Author: "alice", HeadBranch: "feature",
				BaseBranch: "main", HeadCommit: "c0ffee", VCSHost: &client.VCSHost{Hostname: gitlabHost, Type: "Gitlab"}},
			User: client.User{Username: "alice", Teams: []string{"platform"}},
		})
		must(t, err)
		if lock.Key != "acme/infra/envs/prod/default/prod" {
			t.Fatalf("the key should be Atlantis's, from the cleaned path: %s", lock.Key)
		}
		listed, ok := atlantisLocks(t, atlantisURL)[lock.Key]
		if !ok {
			t.Fatalf("Atlantis's GET /api/locks does not list %s", lock.Key)
		}
		want := apiLock{Name: lock.Key, ProjectName: "prod", ProjectRepo: "acme/infra", ProjectRepoPath: "envs/prod",
			PullID: "12", PullURL: mrURL("acme/infra", 12), User: "alice", Workspace: "default"}
		got := listed
		got.Time = time.Time{}
		if got != want {
			t.Fatalf("GET /api/locks:\n got %+v\nwant %+v", got, want)
		}
		if d := listed.Time.Sub(lock.AcquiredAt); d < -time.Millisecond || d > time.Millisecond {
			t.Fatalf("Atlantis reads the lock's time as %v, the service granted it at %v", listed.Time, lock.AcquiredAt)
		}
		status, page := get(t, atlantisURL+"/")
		for _, want := range []string{`<span class="lock-reponame">acme/infra #12</span>`, `<span class="lock-path">envs/prod</span>`,
			`<span class="lock-username">alice</span>`, "/lock?id="} {
			if status != http.StatusOK || !strings.Contains(page, want) {
				t.Fatalf("Atlantis's index page (%d) lacks %q", status, want)
			}
		}
		// The lock's own page, as the index links it.
		status, page = get(t, atlantisURL+"/lock?id="+url.QueryEscape(lock.Key))
		if status != http.StatusOK || !strings.Contains(page, "envs/prod") || !strings.Contains(page, mrURL("acme/infra", 12)) {
			t.Fatalf("Atlantis's page of the lock (%d) lacks its path or pull:\n%s", status, page)
		}
	})

	t.Run("unlocking in Atlantis's UI frees it for the service", func(t *testing.T) {
		key := "acme/infra/envs/prod/default/prod"
		// As a plan would have: pull 12's project planned, in Atlantis's pull status.
		pull12 := models.PullRequest{Num: 12, HeadCommit: "c0ffee", BaseBranch: "main", BaseRepo: models.Repo{
			FullName: "acme/infra", Owner: "acme", Name: "infra", VCSHost: models.VCSHost{Hostname: gitlabHost, Type: models.Gitlab}}}
		_, err := atlantisDB.UpdatePullWithResults(pull12, []command.ProjectResult{{
			Command: command.Plan, RepoRelDir: "envs/prod", Workspace: "default", ProjectName: "prod",
			ProjectCommandOutput: command.ProjectCommandOutput{PlanSuccess: &models.PlanSuccess{TerraformOutput: "plan"}},
		}})
		must(t, err)

		req, _ := http.NewRequest(http.MethodDelete, atlantisURL+"/locks?id="+url.QueryEscape(key), nil)
		resp, err := http.DefaultClient.Do(req)
		must(t, err)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close() //nolint:errcheck
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("DELETE /locks?id=%s: %d %s", key, resp.StatusCode, body)
		}
		held, err := c.Get(ctx, key)
		must(t, err)
		if held != nil {
			t.Fatalf("the service still sees the lock Atlantis's UI deleted: %+v", held)
		}
		other, err := c.Acquire(ctx, client.AcquireRequest{
			Project: client.Project{RepoFullName: "acme/infra", Path: "envs/prod", ProjectName: "prod"},
			Pull:    client.Pull{Num: 13, URL: mrURL("acme/infra", 13)}, User: client.User{Username: "bob"},
		})
		must(t, err)
		if other.Pull.Num != 13 {
			t.Fatalf("pull 13 should now hold it: %+v", other)
		}
		// Atlantis found the pull from the lock the service wrote: its plan is discarded
		// under {host}::{repo}::{num}, and the merge request got Atlantis's comment.
		status, err := atlantisDB.GetPullStatus(pull12)
		must(t, err)
		if status == nil || len(status.Projects) != 1 || status.Projects[0].Status != models.DiscardedPlanStatus {
			t.Fatalf("Atlantis should mark pull 12's plan discarded, pull status: %+v", status)
		}
		var found bool
		for _, n := range g.comments() {
			if n.Path == "/api/v4/projects/acme%2Finfra/merge_requests/12/notes" && strings.Contains(n.Body, "discarded") {
				found = true
			}
		}
		if !found {
			t.Fatalf("Atlantis should comment on merge request 12 of acme/infra, comments: %+v", g.comments())
		}
		_, err = c.Release(ctx, key)
		must(t, err)
	})

	t.Run("a lock Atlantis wrote refuses another pull in the service", func(t *testing.T) {
		project := models.NewProject("acme/infra", "envs/dev", "dev")
		written := models.ProjectLock{Project: project, Workspace: "default", Time: time.Now(),
			User: models.User{Username: "carol"},
			Pull: models.PullRequest{Num: 30, URL: mrURL("acme/infra", 30), Author: "carol", BaseRepo: models.Repo{
				FullName: "acme/infra", Owner: "acme", Name: "infra", VCSHost: models.VCSHost{Hostname: gitlabHost, Type: models.Gitlab}}},
		}
		ok, _, err := atlantisDB.TryLock(written)
		must(t, err)
		if !ok {
			t.Fatal("Atlantis's database should write the lock")
		}
		key := models.GenerateLockKey(project, "default")
		if _, listed := atlantisLocks(t, atlantisURL)[key]; !listed {
			t.Fatalf("the Atlantis server should list the lock its database wrote")
		}
		_, err = c.Acquire(ctx, client.AcquireRequest{
			Project: client.Project{RepoFullName: "acme/infra", Path: "./envs/dev", ProjectName: "dev"},
			Pull:    client.Pull{Num: 31}, User: client.User{Username: "dave"},
		})
		var held *client.HeldError
		if !errorsAs(err, &held) || held.Holder == nil || held.Holder.Pull.Num != 30 || held.Holder.User.Username != "carol" {
			t.Fatalf("pull 31 must be refused with Atlantis's pull 30 as holder, got %v", err)
		}
		// The pull that holds it in Atlantis holds it in the service too.
		again, err := c.Acquire(ctx, client.AcquireRequest{
			Project: client.Project{RepoFullName: "acme/infra", Path: "envs/dev", ProjectName: "dev"},
			Pull:    client.Pull{Num: 30}, User: client.User{Username: "carol"},
		})
		must(t, err)
		if again.Pull.Num != 30 {
			t.Fatalf("pull 30 asking the service should find its own lock: %+v", again)
		}
	})

	t.Run("closing a pull frees only that repository's locks in the service, unlike Atlantis", func(t *testing.T) {
		for _, repo := range []string{"org/app", "org/app-infra"} {
			_, err := c.Acquire(ctx, client.AcquireRequest{
				Project: client.Project{RepoFullName: repo, Path: "."},
				Pull:    client.Pull{Num: 5, URL: mrURL(repo, 5), VCSHost: &client.VCSHost{Hostname: gitlabHost, Type: "Gitlab"}},
			})
			must(t, err)
		}
		// The service: PR 5 of org/app closes; org/app-infra's PR 5 keeps its lock.
		released, err := c.ReleasePull(ctx, "org/app", 5)
		must(t, err)
		if len(released) != 1 || released[0].Project.RepoFullName != "org/app" {
			t.Fatalf("the service must free only org/app's lock, freed %+v", released)
		}
		if kept := atlantisLocks(t, atlantisURL)["org/app-infra/./default/"]; kept.PullID != "5" {
			t.Fatalf("org/app-infra's PR 5 must keep its lock, Atlantis lists %+v", atlantisLocks(t, atlantisURL))
		}
		// Atlantis, told by its VCS that MR 5 of org/app closed, frees by prefix: PR 5 of
		// org/app-infra loses its lock too.
		_, err = c.Acquire(ctx, client.AcquireRequest{Project: client.Project{RepoFullName: "org/app", Path: "."},
			Pull: client.Pull{Num: 5, URL: mrURL("org/app", 5), VCSHost: &client.VCSHost{Hostname: gitlabHost, Type: "Gitlab"}}})
		must(t, err)
		closeMergeRequest(t, atlantisURL, g, "org/app", 5)
		for _, key := range []string{"org/app/./default/", "org/app-infra/./default/"} {
			if held, err := c.Get(ctx, key); err != nil || held != nil {
				t.Fatalf("Atlantis's UnlockByPull(org/app, 5) is expected to free %s (prefix match), it is held by %+v (%v)", key, held, err)
			}
		}
	})
}

// closeMergeRequest sends Atlantis GitLab's webhook for merge request num of repo closing.
func closeMergeRequest(t *testing.T, atlantisURL string, g *gitlab, repo string, num int) {
	t.Helper()
	clone := fmt.Sprintf("%s/%s.git", g.URL, repo)
	event := map[string]any{
		"object_kind": "merge_request", "event_type": "merge_request",
		"user":    map[string]any{"username": "alice"},
		"project": map[string]any{"path_with_namespace": repo, "git_http_url": clone, "web_url": g.URL + "/" + repo},
		"object_attributes": map[string]any{
			"iid": num, "state": "closed", "action": "close", "url": fmt.Sprintf("%s/%s/-/merge_requests/%d", g.URL, repo, num),
			"source_branch": "feature", "target_branch": "main", "last_commit": map[string]any{"id": "c0ffee"},
			"source": map[string]any{"path_with_namespace": repo, "git_http_url": clone},
			"target": map[string]any{"path_with_namespace": repo, "git_http_url": clone},
		},
	}
	body, _ := json.Marshal(event)
	req, _ := http.NewRequest(http.MethodPost, atlantisURL+"/events", strings.NewReader(string(body)))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Gitlab-Event", "Merge Request Hook")
	resp, err := http.DefaultClient.Do(req)
	must(t, err)
	answer, _ := io.ReadAll(resp.Body)
	resp.Body.Close() //nolint:errcheck
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("Atlantis refused the merge request event: %d %s", resp.StatusCode, answer)
	}
}
