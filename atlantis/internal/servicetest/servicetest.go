// Package servicetest starts the real parts the Go tests run against: a redis-server and
// `enhanced-locking serve`, each on a free port of 127.0.0.1, stopped when the test ends.
//
// A part that cannot be found fails the test with how to get it; nothing is skipped.
package servicetest

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Loopback is the only address tests listen on or call.
const Loopback = "127.0.0.1"

// FreePort is a TCP port of 127.0.0.1 that nothing listens on right now.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", Loopback+":0")
	if err != nil {
		t.Fatalf("no free loopback port: %v", err)
	}
	defer l.Close() //nolint:errcheck
	return l.Addr().(*net.TCPAddr).Port
}

// RepoRoot is the repository's top directory (the one with pyproject.toml).
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "pyproject.toml")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("cannot find the repository root (pyproject.toml) above the test's directory")
		}
		dir = parent
	}
}

// Process is one started process: its address, and its output for failure reports.
type Process struct {
	Name string
	Addr string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

// Exited reports whether the process has ended.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Output is what the process wrote so far (stdout and stderr).
func (p *Process) Output() string {
	data, _ := os.ReadFile(p.log)
	return string(data)
}

// Stop ends the process: SIGTERM, then SIGKILL after a grace period.
func (p *Process) Stop() {
	if p.Exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// Start runs argv with its output in a file of t's temp dir; the process dies with the test
// process (Pdeathsig) and is stopped at cleanup.
func Start(t testing.TB, name string, env []string, argv ...string) *Process {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), name+".log")
	out, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr, cmd.Env = out, out, env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("cannot start %s: %v", name, err)
	}
	p := &Process{Name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.Stop()
		out.Close() //nolint:errcheck
		if t.Failed() {
			t.Logf("--- output of %s ---\n%s", name, tail(p.Output(), 4000))
		}
	})
	return p
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// Redis starts a redis-server without persistence on a free loopback port; "host:port".
func Redis(t testing.TB) string {
	t.Helper()
	return RedisServer(t).Addr
}

// RedisServer is Redis's process, for a test that stops it (a store that goes down).
func RedisServer(t testing.TB) *Process {
	t.Helper()
	return RedisServerOn(t, FreePort(t))
}

// RedisServerOn is RedisServer on port: a store started again where it was (its data gone,
// as it keeps none), or one started after a setting already names it.
func RedisServerOn(t testing.TB, port int) *Process {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatal("redis-server is not installed: run hack/ensure-redis.sh (Debian's redis-server package)")
	}
	p := Start(t, "redis-"+strconv.Itoa(port), os.Environ(), bin, "--port", strconv.Itoa(port),
		"--bind", Loopback, "--save", "", "--appendonly", "no", "--protected-mode", "yes")
	addr := net.JoinHostPort(Loopback, strconv.Itoa(port))
	waitFor(t, p, func() bool {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return false
		}
		defer conn.Close() //nolint:errcheck
		_, _ = conn.Write([]byte("PING\r\n"))
		line, err := bufio.NewReader(conn).ReadString('\n')
		return err == nil && strings.HasPrefix(line, "+PONG")
	})
	p.Addr = addr
	return p
}

// EnhancedLockingCommand is the installed `enhanced-locking` console script: from
// ENHANCED_LOCKING_COMMAND, or the repository's .venv (made by `make venv`).
func EnhancedLockingCommand(t testing.TB) string {
	t.Helper()
	if cmd := os.Getenv("ENHANCED_LOCKING_COMMAND"); cmd != "" {
		return cmd
	}
	venv := filepath.Join(RepoRoot(t), ".venv", "bin", "enhanced-locking")
	if _, err := os.Stat(venv); err != nil {
		t.Fatalf("the enhanced-locking command is not installed at %s: run `make venv` in the "+
			"repository (or set ENHANCED_LOCKING_COMMAND)", venv)
	}
	return venv
}

// Service is a running `enhanced-locking serve`.
type Service struct {
	*Process
	URL     string
	DataDir string
	env     []string
	argv    []string
	ready   func(status int) bool
}

// Serve starts `enhanced-locking serve` on a free loopback port with its own data dir and
// extra arguments (e.g. "--enhanced-locking-legacy-backend", "redis", ...), and waits until
// it is ready (/readyz answers 200).
func Serve(t testing.TB, args ...string) *Service {
	t.Helper()
	return serve(t, "", args...)
}

// ServeAnswering is Serve for a service that is not to be ready (a store it needs does not
// answer): it waits until the service answers /readyz at all, 200 or 503.
func ServeAnswering(t testing.TB, args ...string) *Service {
	t.Helper()
	return serveUntil(t, "", func(status int) bool {
		return status == http.StatusOK || status == http.StatusServiceUnavailable
	}, args...)
}

// PreviousRelease is the service's release before this one (the commit before a refresh
// took a ttl of 0s): a newer adapter must work with it, as Atlantis and the service are
// upgraded apart.
const PreviousRelease = "ae4886abc1c7e0c4c5251b86a95367e72ef20319"

// ServeRelease is Serve with the service's code as it was at commit (e.g. PreviousRelease),
// taken from the repository's history with `git archive` and run by the same command.
func ServeRelease(t testing.TB, commit string, args ...string) *Service {
	t.Helper()
	tree := t.TempDir()
	root := RepoRoot(t)
	// A shallow clone lacks the commit: fetch it from where the clone came from, once.
	if exec.Command("git", "-C", root, "cat-file", "-e", commit+"^{commit}").Run() != nil {
		if out, err := exec.Command("git", "-C", root, "fetch", "--quiet", "origin", commit).CombinedOutput(); err != nil {
			t.Logf("fetching %s from origin: %v\n%s", commit, err, out)
		}
	}
	archive := exec.Command("sh", "-c", `git -C "$1" archive "$2" operator | tar -x -C "$3"`,
		"archive", root, commit, tree)
	if out, err := archive.CombinedOutput(); err != nil {
		t.Fatalf("cannot take the service's code at %s from the repository's history "+
			"(a shallow clone has none: `git fetch --unshallow`): %v\n%s", commit, err, out)
	}
	return serve(t, filepath.Join(tree, "operator"), args...)
}

// serve starts the service, its package imported from pythonPath when given, and waits until
// it is ready.
func serve(t testing.TB, pythonPath string, args ...string) *Service {
	t.Helper()
	return serveUntil(t, pythonPath, func(status int) bool { return status == http.StatusOK }, args...)
}

// serveUntil starts the service and waits until its /readyz answers a status done accepts.
func serveUntil(t testing.TB, pythonPath string, done func(status int) bool, args ...string) *Service {
	t.Helper()
	return launch(t, pythonPath, "serve", nil, done, args...)
}

// launch runs the enhanced-locking command (serve, operator) on a free loopback port with its
// own data dir, its package imported from pythonPath when given and the variables of extra
// set, and waits until its /readyz answers a status done accepts.
func launch(t testing.TB, pythonPath, command string, extra []string, done func(status int) bool,
	args ...string) *Service {
	t.Helper()
	port := FreePort(t)
	dataDir := t.TempDir()
	argv := append([]string{EnhancedLockingCommand(t), command, "--host", Loopback,
		"--port", strconv.Itoa(port), "--data-dir", dataDir, "--log-level", "warning"}, args...)
	var env []string
	for _, kv := range os.Environ() {
		// A developer's own settings must not change what a test sees.
		if strings.HasPrefix(kv, "ATLANTIS_ENHANCED_LOCKING_") || strings.HasPrefix(kv, "ENHANCED_LOCKING_") ||
			strings.HasPrefix(kv, "ATLANTIS_DATA_DIR=") {
			continue
		}
		if pythonPath != "" && strings.HasPrefix(kv, "PYTHONPATH=") {
			continue
		}
		env = append(env, kv)
	}
	if pythonPath != "" {
		env = append(env, "PYTHONPATH="+pythonPath)
	}
	env = append(env, extra...)
	svc := &Service{URL: fmt.Sprintf("http://%s:%d", Loopback, port), DataDir: dataDir,
		env: env, argv: argv, ready: done}
	svc.start(t)
	return svc
}

// start runs the service's command and waits until its /readyz answers a status s.ready takes.
func (s *Service) start(t testing.TB) {
	t.Helper()
	port := strings.TrimPrefix(s.URL, "http://"+Loopback+":")
	p := Start(t, "enhanced-locking-"+port, s.env, s.argv...)
	waitFor(t, p, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.URL+"/readyz", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close() //nolint:errcheck
		return s.ready(resp.StatusCode)
	})
	p.Addr = net.JoinHostPort(Loopback, port)
	s.Process = p
}

// Kill ends the service with SIGKILL, as a crash or an evicted pod does.
func (s *Service) Kill() {
	if !s.Exited() {
		_ = s.cmd.Process.Kill()
		<-s.Process.done
	}
}

// Restart starts the service again, stopped or killed, on the same port and data dir.
func (s *Service) Restart(t testing.TB) {
	t.Helper()
	s.Stop()
	s.start(t)
}

// AtlantisToken is the bearer token of the user atlantis, who holds the locker role (what
// Atlantis needs), on a service started with the flags of StaticAccess.
const AtlantisToken = "atlantis-token"

// StaticAccess are the serve flags of static access control, its tokens and role map given
// inline: AtlantisToken of the user atlantis with the role locker, and each of others
// ("token,user,uid"), with the roles besides atlantis's ("admin=user:ada").
func StaticAccess(others []string, roles ...string) []string {
	return []string{"--enhanced-locking-auth", "static",
		"--enhanced-locking-auth-tokens",
		strings.Join(append([]string{AtlantisToken + ",atlantis,1"}, others...), "\n"),
		"--enhanced-locking-auth-roles",
		strings.Join(append([]string{"locker=user:atlantis"}, roles...), ";")}
}

// RedisArgs are the serve flags that put the legacy locker (and the enhanced one, when
// enabled) on the Redis at addr: the legacy store then speaks Atlantis's own Redis layout.
func RedisArgs(addr string) []string {
	return []string{"--enhanced-locking-legacy-backend", "redis", "--enhanced-locking-backend", "redis",
		"--enhanced-locking-redis-addr", addr}
}

func waitFor(t testing.TB, p *Process, ready func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if p.Exited() {
			break
		}
		if ready() {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.Stop()
	t.Fatalf("%s did not become ready within 30s:\n%s", p.Name, tail(p.Output(), 4000))
}

// Proxy is a reverse proxy on loopback in front of the service at serviceURL, as one runs in
// front of it in a cluster; it answers its own URL. Each request goes to answer first, which
// may answer it itself (and return true) instead of passing it on. The proxy gives up on the
// service after patience (answering 502, as a proxy whose upstream timed out; 0: no bound).
// Closed when the test ends.
func Proxy(t testing.TB, serviceURL string, patience time.Duration,
	answer func(w http.ResponseWriter, r *http.Request) bool) string {
	t.Helper()
	target, err := url.Parse(serviceURL)
	if err != nil {
		t.Fatal(err)
	}
	forward := httputil.NewSingleHostReverseProxy(target)
	upstream := &http.Transport{ResponseHeaderTimeout: patience}
	forward.Transport = upstream
	l, err := net.Listen("tcp", Loopback+":0")
	if err != nil {
		t.Fatal(err)
	}
	server := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !answer(w, r) {
			forward.ServeHTTP(w, r)
		}
	})}
	go server.Serve(l) //nolint:errcheck
	t.Cleanup(func() {
		server.Close() //nolint:errcheck
		upstream.CloseIdleConnections()
	})
	return "http://" + l.Addr().String()
}
