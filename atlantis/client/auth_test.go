package client_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
	"github.com/runatlantis/enhanced-locking/atlantis/internal/servicetest"
)

// catcher is another web server on this machine (the same host, another port): it notes
// every Authorization header it is sent.
func catcher(t *testing.T) (*httptest.Server, func() []string) {
	t.Helper()
	var mu sync.Mutex
	var seen []string
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Method+" "+r.URL.Path+" Authorization="+r.Header.Get("Authorization"))
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"locks": []}`))
	}))
	t.Cleanup(server.Close)
	return server, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), seen...)
	}
}

func TestTheTokenIsNeverSentToAnotherOriginARedirectNames(t *testing.T) {
	// What stands at the service's URL (a proxy, an ingress misconfigured, a host taken over)
	// answers every call with a redirect elsewhere: to another port of the same host, to the
	// same host in plain http, to a subdomain. Go's client keeps the Authorization header on
	// a redirect to the same host name (any port or scheme) or a subdomain of it.
	other, seen := catcher(t)
	otherURL, err := url.Parse(other.URL)
	must(t, err)
	const token = "s3cret-redirected-token"
	for _, to := range []string{
		other.URL,                             // same host, another port
		"http://localhost:" + otherURL.Port(), // what a service on localhost would name
	} {
		var asked atomic.Int32
		redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			asked.Add(1)
			http.Redirect(w, r, to+r.URL.RequestURI(), http.StatusTemporaryRedirect)
		}))
		t.Cleanup(redirector.Close)
		base := redirector.URL
		if strings.HasPrefix(to, "http://localhost:") {
			base = strings.Replace(redirector.URL, "127.0.0.1", "localhost", 1)
		}
		c, err := client.New(base, client.WithToken(token))
		must(t, err)
		ctx := context.Background()
		_, listErr := c.List(ctx, client.ListFilter{})
		_, acquireErr := c.Acquire(ctx, request("acme/infra", "envs/prod", 1))
		_, forceErr := c.ForceUnlock(ctx, "acme/infra/envs/prod/default/", "stuck")
		stream, eventsErr := c.Events(ctx, client.EventFilter{})
		if stream != nil {
			stream.Close() //nolint:errcheck
		}
		for name, err := range map[string]error{"List": listErr, "Acquire": acquireErr,
			"ForceUnlock": forceErr, "Events": eventsErr} {
			var unavailable *client.UnavailableError
			if !errors.As(err, &unavailable) || !strings.Contains(err.Error(), "redirect") {
				t.Errorf("%s through a redirect to %s: want an *UnavailableError naming the "+
					"redirect, got %v", name, to, err)
			}
			if err != nil && strings.Contains(err.Error(), token) {
				t.Errorf("%s: the token shows in the error: %v", name, err)
			}
		}
		if n := asked.Load(); n != 4 {
			t.Errorf("each call should be sent once (a retry meets the same redirect), "+
				"sent %d for 4 calls", n)
		}
	}
	if got := seen(); len(got) != 0 {
		t.Fatalf("the other origin was sent %d calls (the token must never go there): %v", len(got), got)
	}
}

func TestARedirectWithinTheServicesOriginIsFollowedWithTheToken(t *testing.T) {
	// A proxy that moved the API under a prefix redirects the old paths on its own origin:
	// the token goes on to where it points (the same scheme, host and port).
	svc := servicetest.Serve(t, servicetest.StaticAccess(nil)...)
	target, err := url.Parse(svc.URL)
	must(t, err)
	forward := httputil.NewSingleHostReverseProxy(target)
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if rest, moved := strings.CutPrefix(r.URL.Path, "/old"); moved {
			to := *r.URL
			to.Path = rest
			http.Redirect(w, r, to.RequestURI(), http.StatusPermanentRedirect)
			return
		}
		forward.ServeHTTP(w, r)
	}))
	t.Cleanup(front.Close)
	c, err := client.New(front.URL+"/old", client.WithToken(servicetest.AtlantisToken),
		client.WithRetries(1, 0))
	must(t, err)
	lock, err := c.Acquire(context.Background(), request("acme/infra", "envs/prod", 1))
	must(t, err)
	if lock.Pull.Num != 1 {
		t.Fatalf("the acquire through the redirect should hold the lock, got %+v", lock)
	}
}

func TestForceUnlockSendsItsReasonToAServiceWithAccessControl(t *testing.T) {
	// With access control on (every deployment the chart makes), a force-unlock without a
	// reason is refused 422: the reason is what the audit trail keeps of why.
	svc := servicetest.Serve(t, servicetest.StaticAccess([]string{"admin-token,ada,2"},
		"admin=user:ada")...)
	ctx := context.Background()
	atlantis, err := client.New(svc.URL, client.WithToken(servicetest.AtlantisToken))
	must(t, err)
	admin, err := client.New(svc.URL, client.WithToken("admin-token"))
	must(t, err)
	lock, err := atlantis.Acquire(ctx, request("acme/infra", "envs/prod", 3))
	must(t, err)
	var invalid *client.InvalidError
	if _, err := admin.ForceUnlock(ctx, lock.Key, ""); !errors.As(err, &invalid) || invalid.Field != "reason" {
		t.Fatalf("a force-unlock without a reason: want the service's 422 naming reason, got %v", err)
	}
	forced, err := admin.ForceUnlock(ctx, lock.Key, "runner died mid-apply")
	must(t, err)
	if forced == nil || forced.Pull.Num != 3 {
		t.Fatalf("the force-unlock should free pull 3's lock, got %+v", forced)
	}
	if held, err := admin.Get(ctx, lock.Key); err != nil || held != nil {
		t.Fatalf("the key should be free, got %+v, %v", held, err)
	}
	var denied *client.DeniedError
	again, err := atlantis.Acquire(ctx, request("acme/infra", "envs/prod", 4))
	must(t, err)
	if _, err := atlantis.ForceUnlock(ctx, again.Key, "not mine to free"); !errors.As(err, &denied) || denied.Status != 403 || denied.Verb != "force-unlock" {
		t.Fatalf("a locker's force-unlock: want a 403 naming force-unlock, got %v", err)
	}
}

func TestATokenFileRotatedWhileRunningIsReadAgain(t *testing.T) {
	// A Kubernetes projected ServiceAccount token (one minted for the service's audience
	// expires within hours) is rotated by the kubelet while Atlantis runs: a token read once
	// at start is refused from its rotation on.
	dir := t.TempDir()
	served := filepath.Join(dir, "tokens.csv")
	must(t, os.WriteFile(served, []byte("tok-first-4f1e9a,atlantis,1\n"), 0o600))
	svc := servicetest.Serve(t, "--enhanced-locking-auth", "static",
		"--enhanced-locking-auth-tokens-file", served,
		"--enhanced-locking-auth-roles", "locker=user:atlantis")
	mounted := filepath.Join(dir, "token")
	must(t, os.WriteFile(mounted, []byte("tok-first-4f1e9a\n"), 0o600))
	ctx := context.Background()
	once, err := client.New(svc.URL, client.WithToken("tok-first-4f1e9a"))
	must(t, err)
	following, err := client.New(svc.URL, client.WithTokenFile(mounted))
	must(t, err)
	_, err = following.Acquire(ctx, request("acme/infra", "envs/prod", 1))
	must(t, err)

	// The rotation: the service takes the new token only, the mounted file holds it.
	must(t, os.WriteFile(served, []byte("tok-second-77c2d0,atlantis,1\n"), 0o600))
	must(t, os.WriteFile(mounted, []byte("tok-second-77c2d0\n"), 0o600))
	var denied *client.DeniedError
	deadline := time.Now().Add(60 * time.Second)
	for {
		_, err := once.List(ctx, client.ListFilter{})
		if errors.As(err, &denied) && denied.Status == 401 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the service should refuse the rotated-out token within a minute, got %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for {
		locks, err := following.List(ctx, client.ListFilter{})
		if err == nil {
			if len(locks) != 1 || locks[0].Pull.Num != 1 {
				t.Fatalf("the lock taken before the rotation should be listed, got %+v", locks)
			}
			break
		}
		if !errors.As(err, &denied) || time.Now().After(deadline) {
			t.Fatalf("a client following the token file should be let in with the new token, got %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// A file that cannot be read keeps the token read last; one that is missing at the start
	// is refused by New, naming the file and never a token.
	must(t, os.Remove(mounted))
	time.Sleep(1100 * time.Millisecond)
	_, err = following.List(ctx, client.ListFilter{})
	must(t, err)
	_, err = client.New(svc.URL, client.WithTokenFile(mounted))
	var invalid *client.InvalidError
	if !errors.As(err, &invalid) || !strings.Contains(err.Error(), mounted) {
		t.Fatalf("a token file that cannot be read at New: want an *InvalidError naming it, got %v", err)
	}
}
