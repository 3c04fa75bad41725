package client_test

import (
	"bufio"
	"context"
	"errors"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
	"github.com/runatlantis/enhanced-locking/atlantis/internal/servicetest"
)

// heldStream opens an event stream on the service at serviceURL and keeps it open (taking one
// of the service's streams) until the returned function is called or the test ends.
func heldStream(t *testing.T, serviceURL string) func() {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, serviceURL+"/v1/events", nil)
	must(t, err)
	resp, err := http.DefaultClient.Do(req)
	must(t, err)
	if resp.StatusCode != http.StatusOK {
		cancel()
		t.Fatalf("the held stream should open, got %d", resp.StatusCode)
	}
	// Its first line: the service follows the events for it (the stream is counted).
	if _, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil {
		cancel()
		t.Fatal(err)
	}
	closed := func() { cancel(); resp.Body.Close() } //nolint:errcheck
	t.Cleanup(closed)
	return closed
}

// reopenedThrough is a server whose first event stream it answers itself, following and then
// broken at once, and which passes every later request (the stream's reopenings) on to the
// service at serviceURL; it counts the reopenings the service refused 429, and signals each.
func reopenedThrough(t *testing.T, serviceURL string) (string, *atomic.Int32, <-chan struct{}) {
	t.Helper()
	target, err := url.Parse(serviceURL)
	must(t, err)
	var refused atomic.Int32
	signal := make(chan struct{}, 16)
	forward := httputil.NewSingleHostReverseProxy(target)
	forward.ModifyResponse = func(resp *http.Response) error {
		if resp.StatusCode == http.StatusTooManyRequests {
			refused.Add(1)
			signal <- struct{}{}
		}
		return nil
	}
	var opened atomic.Int32
	return servicetest.Proxy(t, serviceURL, 0, func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/v1/events" || opened.Add(1) > 1 {
			forward.ServeHTTP(w, r)
			return true
		}
		w.Header().Set("Content-Type", "text/event-stream")
		_, _ = w.Write([]byte(": following\n\n"))
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler) // the connection breaks
	}), &refused, signal
}

func TestAStreamReopeningRefusedAtTheServicesLimitWaitsItsRetryAfter(t *testing.T) {
	// The service serves one stream per client address here, held by another stream: a
	// stream's reopening is answered 429 with Retry-After (5s). Next waits that long before
	// it tries again (before, it tried again after its own backoff, 1ms here, and gave up
	// after its three attempts in a row within milliseconds), and answers the 429 at once
	// when the wait would outrun its context.
	svc := servicetest.Serve(t, "--enhanced-locking-enabled",
		"--enhanced-locking-events-max-streams-per-client", "1")
	other := heldStream(t, svc.URL)
	through, refused, _ := reopenedThrough(t, svc.URL)
	c, err := client.New(through, client.WithRetries(3, time.Millisecond))
	must(t, err)
	short, cancel := context.WithTimeout(context.Background(), 4*time.Second)
	defer cancel()
	stream, err := c.Events(short, client.EventFilter{})
	must(t, err)
	defer stream.Close() //nolint:errcheck
	_, err = stream.Next()
	var unavailable *client.UnavailableError
	if !errors.As(err, &unavailable) || unavailable.Status != http.StatusTooManyRequests ||
		errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a reopening refused 429 whose Retry-After outruns the context should answer "+
			"the 429 at once, got %v", err)
	}
	if n := refused.Load(); n != 1 {
		t.Fatalf("the stream should be reopened once within its 4s (the Retry-After says 5s), "+
			"was refused %d times", n)
	}

	// With time for it: once the other stream closed, the reopening after the Retry-After
	// is served, and the stream reads on.
	through, refused, signal := reopenedThrough(t, svc.URL)
	c, err = client.New(through, client.WithRetries(3, time.Millisecond))
	must(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	stream, err = c.Events(ctx, client.EventFilter{Repo: "acme/limit"})
	must(t, err)
	defer stream.Close() //nolint:errcheck
	done := nexting(stream)
	<-signal
	other()
	direct, err := client.New(svc.URL)
	must(t, err)
	// The stream broke before its first event: its reopening, once served, is said by a gap
	// (nothing to resume after), then it reads on.
	if got := <-done; got.err != nil || got.event.Type != client.EventGap ||
		got.event.Details["reason"] != client.GapReopened {
		t.Fatalf("the reopening served should be said by a gap, got %+v, %v", got.event, got.err)
	}
	pull := 1
	if got := lockUntilRead(ctx, t, direct, "acme/limit", &pull, nexting(stream)); got.err != nil ||
		got.event.Type != "acquired" {
		t.Fatalf("the stream should read on once the service serves it, got %+v, %v",
			got.event, got.err)
	}
	if n := refused.Load(); n != 1 {
		t.Fatalf("the reopening should be refused once, then served; was refused %d times", n)
	}
}

func TestARetryAfterOfAnHourIsWaitedAtMostTheCap(t *testing.T) {
	// A proxy in front of the service answers a stream's reopening 429 with Retry-After: 3600
	// (its own limit): Next does not wait an hour, nor give up at once because an hour
	// outruns its context; it waits at most 10s, then reopens, and reads on.
	svc := servicetest.Serve(t, "--enhanced-locking-enabled")
	target, err := url.Parse(svc.URL)
	must(t, err)
	forward := httputil.NewSingleHostReverseProxy(target)
	var opened atomic.Int32
	through := servicetest.Proxy(t, svc.URL, 0, func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/v1/events" {
			return false
		}
		switch opened.Add(1) {
		case 1:
			w.Header().Set("Content-Type", "text/event-stream")
			_, _ = w.Write([]byte(": following\n\n"))
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler) // the connection breaks
		case 2:
			w.Header().Set("Retry-After", "3600")
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusTooManyRequests)
			_, _ = w.Write([]byte(`{"error": "too many streams from this address"}`))
			return true
		default:
			forward.ServeHTTP(w, r)
			return true
		}
	})
	c, err := client.New(through, client.WithRetries(3, time.Millisecond))
	must(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	stream, err := c.Events(ctx, client.EventFilter{Repo: "acme/cap"})
	must(t, err)
	defer stream.Close() //nolint:errcheck
	if n := opened.Load(); n != 1 {
		t.Fatalf("Events should open the stream once, opened %d times", n)
	}
	// The stream broke before its first event: its reopening, once served, is said by a gap
	// (nothing to resume after), then it reads on.
	if r := <-nexting(stream); r.err != nil || r.event.Type != client.EventGap ||
		r.event.Details["reason"] != client.GapReopened {
		t.Fatalf("the reopening served should be said by a gap, got %+v, %v", r.event, r.err)
	}
	pull := 1
	if got := lockUntilRead(ctx, t, c, "acme/cap", &pull, nexting(stream)); got.err != nil ||
		got.event.Type != "acquired" {
		t.Fatalf("after at most the capped wait the stream should read on, got %+v, %v",
			got.event, got.err)
	}
	if n := opened.Load(); n != 3 {
		t.Fatalf("the stream should be opened, refused for an hour once, then reopened: "+
			"opened %d times", n)
	}
}
