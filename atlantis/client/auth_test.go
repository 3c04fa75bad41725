package client_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

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
	svc := servicetest.Serve(t, "--enhanced-locking-auth", "static",
		"--enhanced-locking-auth-tokens", "atlantis-token,atlantis,1",
		"--enhanced-locking-auth-roles", "locker=user:atlantis")
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
	c, err := client.New(front.URL+"/old", client.WithToken("atlantis-token"), client.WithRetries(1, 0))
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
	svc := servicetest.Serve(t, "--enhanced-locking-auth", "static",
		"--enhanced-locking-auth-tokens", "atlantis-token,atlantis,1\nadmin-token,ada,2",
		"--enhanced-locking-auth-roles", "locker=user:atlantis;admin=user:ada")
	ctx := context.Background()
	atlantis, err := client.New(svc.URL, client.WithToken("atlantis-token"))
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
