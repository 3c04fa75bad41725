package client

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Event is something that happened to a lock or to the configuration.
type Event struct {
	// ID orders the events ("<ms>-<seq>"); a stream resumes after it.
	ID   string    `json:"id"`
	Type string    `json:"type"`
	Time time.Time `json:"time"`
	Key  string    `json:"key"`
	Repo string    `json:"repo"`
	Lock *Lock     `json:"lock"`
	// Details carries what the type adds (a queue position, a deadlock's cycle...).
	Details map[string]any `json:"details"`
}

// EventGap is the type of the event a resumed stream starts with when some events after
// Last-Event-ID are no longer kept: re-read the state rather than trust the replay. Next
// also returns one (reason GapReopened) when it reopened a stream that had no event to
// resume after. A switch
// of the enhanced store moves the events to another bus and tells a stream so by a gap
// whose ID is the new bus's, where the stream resumes from then on.
const EventGap = "gap"

// EventFilter narrows a stream; LastEventID resumes after that event.
type EventFilter struct {
	Repo        string
	KeyPrefix   string
	Types       []string
	LastEventID string
}

// EventStream reads Server-Sent Events from GET /v1/events. When the connection breaks it
// reconnects (with backoff) and resumes after the last event it returned, sending
// Last-Event-ID, so no event is skipped or repeated while the service keeps them.
type EventStream struct {
	c      *Client
	ctx    context.Context
	cancel context.CancelFunc
	filter EventFilter

	mu     sync.Mutex
	body   io.ReadCloser
	reader *bufio.Reader
	// hangUp ends the open connection's request (its context, a child of ctx).
	hangUp context.CancelFunc
	// failures: the failed connections in a row a reopened gap (GapReopened) was returned
	// after; the next Next counts on from them, so a stream that keeps failing before any
	// event is given up after the attempts, as within one Next.
	failures int
}

// Events opens the event stream. It returns once the service follows the events for it
// (the stream's ": following" line, sent once its start is fixed): every event published
// after Events returned is on the stream, so a state read then, or a lock taken then, misses
// nothing (the headers come earlier, while a service over Redis or etcd still asks its store
// where "now" is). The first connection is made before it returns, so an invalid filter, an
// unreachable service or one that neither answers nor follows within the client's call
// timeout (WithCallTimeout) is an error here. Close it when done.
func (c *Client) Events(ctx context.Context, f EventFilter) (*EventStream, error) {
	ctx, cancel := context.WithCancel(ctx)
	s := &EventStream{c: c, ctx: ctx, cancel: cancel, filter: f}
	if _, err := s.connect(true); err != nil {
		cancel()
		return nil, err
	}
	return s, nil
}

// LastEventID is the id of the last event Next returned (where a resume starts).
func (s *EventStream) LastEventID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.filter.LastEventID
}

// Close ends the stream.
func (s *EventStream) Close() error {
	s.cancel()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hangUp != nil {
		s.hangUp()
	}
	if s.body != nil {
		return s.body.Close()
	}
	return nil
}

// following is the line an event stream sends once the service follows the events for it.
const following = ": following"

// connect opens a connection of the stream; when the service refused it, also its answer
// (status and body), for Next to judge whether to try again. With untilFollowing it returns
// once the stream follows (its ": following" line), bound as its headers are.
func (s *EventStream) connect(untilFollowing bool) (answer, error) {
	q := url.Values{}
	if s.filter.Repo != "" {
		q.Set("repo", s.filter.Repo)
	}
	if s.filter.KeyPrefix != "" {
		q.Set("keyPrefix", s.filter.KeyPrefix)
	}
	if len(s.filter.Types) > 0 {
		q.Set("type", strings.Join(s.filter.Types, ","))
	}
	// Until its headers arrive (with untilFollowing, its ": following" line), a connection is
	// a call like any other, bound by the call timeout (its body is then bound by the
	// stream's silence, in read): a server or proxy that accepts and never answers is given
	// up, not waited on.
	ctx, hangUp := context.WithCancel(s.ctx)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.c.endpoint("/v1/events", q), nil)
	if err != nil {
		hangUp()
		return answer{}, &InvalidError{Message: err.Error()}
	}
	req.Header.Set("Accept", "text/event-stream")
	if s.filter.LastEventID != "" {
		req.Header.Set("Last-Event-ID", s.filter.LastEventID)
	}
	if bearer := s.c.bearer(); bearer != "" {
		req.Header.Set("Authorization", bearer)
	}
	bound := s.c.callTimeout
	var unanswered *time.Timer
	if bound > 0 {
		unanswered = time.AfterFunc(bound, hangUp)
		defer unanswered.Stop()
	}
	resp, err := s.c.http.Do(req)
	// With untilFollowing, an answer's bound runs on until the line (below).
	answered := err == nil && untilFollowing
	if unanswered != nil && !answered && !unanswered.Stop() && s.ctx.Err() == nil {
		if err == nil {
			resp.Body.Close() //nolint:errcheck
		}
		hangUp()
		return answer{}, &UnavailableError{Op: "events", Message: fmt.Sprintf("GET /v1/events had no "+
			"answer within %v, the call timeout (the service answers at once): given up", bound)}
	}
	if err != nil {
		hangUp()
		return answer{}, &UnavailableError{Op: "events", Err: err}
	}
	if resp.StatusCode != http.StatusOK {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close() //nolint:errcheck
		hangUp()
		got := answer{status: resp.StatusCode, body: data,
			retryAfter: retryAfter(resp.Header.Get("Retry-After"))}
		return got, refusal(call{op: "events"}, got)
	}
	if kind := contentType(resp.Header.Get("Content-Type")); kind != "text/event-stream" {
		// A sign-in page or another web server at the URL: read as a stream it would have no
		// events until it ends.
		resp.Body.Close() //nolint:errcheck
		hangUp()
		return answer{}, &UnavailableError{Op: "events", Status: resp.StatusCode, Message: fmt.Sprintf(
			"GET /v1/events answered %d with %s, not an event stream: is the URL the lock "+
				"service's?", resp.StatusCode, kind)}
	}
	reader := bufio.NewReader(resp.Body)
	if untilFollowing {
		var err error
		reader, err = untilFollows(reader)
		if unanswered != nil && !unanswered.Stop() && s.ctx.Err() == nil {
			resp.Body.Close() //nolint:errcheck
			hangUp()
			return answer{}, &UnavailableError{Op: "events", Message: fmt.Sprintf("GET /v1/events "+
				"did not follow the events (its %q line) within %v, the call timeout (the "+
				"service follows them once its store says where they stand): given up",
				following, bound)}
		}
		if err != nil {
			resp.Body.Close() //nolint:errcheck
			hangUp()
			return answer{}, &UnavailableError{Op: "events", Err: err}
		}
	}
	s.mu.Lock()
	s.body, s.reader, s.hangUp = resp.Body, reader, hangUp
	s.mu.Unlock()
	return answer{}, nil
}

// untilFollows reads the stream up to its ": following" line (keep-alives before it are
// skipped); the reader of what comes after. A stream that sends an event first (a resume's
// gap, or a server that never says it follows) is taken as following from there: its
// reader starts again at that line.
func untilFollows(reader *bufio.Reader) (*bufio.Reader, error) {
	for {
		line, err := reader.ReadString('\n')
		if err != nil {
			return nil, err
		}
		switch trimmed := strings.TrimRight(line, "\r\n"); {
		case trimmed == following:
			return reader, nil
		case trimmed == "" || strings.HasPrefix(trimmed, ":"):
			continue
		default:
			return bufio.NewReader(io.MultiReader(strings.NewReader(line), reader)), nil
		}
	}
}

// Next blocks until the next event. A broken connection is reopened after a jittered pause
// (doubling, as a call's retries do), resuming after the last event returned; a stream that
// had returned no event has nothing to resume after: once its reopening follows the events,
// Next returns a gap (reason GapReopened: re-read the state), then its events. A reopening
// refused as a restart or a rollout of the service refuses it (its port refuses or resets
// the connection, or the connect gets no answer in time), or answered by the service's own
// 503 "unavailable" (it serves no lock call for now: its operator's start, until the
// LockPolicy is applied), is tried again for as long as the stream's context lasts; any
// other failure in a row counts against the client's retry attempts. A reopening refused
// with Retry-After (the service's limit of streams) waits that long, at most
// streamRetryAfterCap, with the jitter on top; when that would outrun the context, the
// refusal is answered at once. After the attempts, when the context ends, or when Close is
// called, it answers an error.
func (s *EventStream) Next() (Event, error) {
	failures := s.failures
	s.failures = 0
	delay := s.c.backoff
	// unopened: why the last reconnection failed (the stream then has no connection to read);
	// refused: the service's answer that refused it, when it answered one.
	var unopened error
	var refused answer
	for {
		ev, err := s.read()
		if err == nil {
			s.mu.Lock()
			s.filter.LastEventID = ev.ID
			s.mu.Unlock()
			return ev, nil
		}
		if s.ctx.Err() != nil {
			return Event{}, &UnavailableError{Op: "events", Err: s.ctx.Err()}
		}
		last := error(&UnavailableError{Op: "events", Err: err})
		if errors.Is(err, errStreamClosed) && unopened != nil {
			last = unopened
		}
		if errors.Is(err, errStreamClosed) && unopened != nil &&
			(restarting(unopened) || notServing(refused)) {
			// Tried for the stream's time, not a count, and never without a pause.
			delay = max(delay, restartBackoff)
		} else if failures++; failures > s.c.attempts {
			return Event{}, last
		}
		pause := time.Duration(rand.Int64N(int64(delay) + 1)) // full jitter, as in do
		if unopened != nil {
			// A refusal's Retry-After (the service's limit of streams, 429 or 503, says 5s),
			// at most streamRetryAfterCap, and the jitter on top: the streams it turned away
			// do not all come back at once.
			pause += min(refused.retryAfter, streamRetryAfterCap)
		}
		if deadline, ok := s.ctx.Deadline(); ok && time.Until(deadline) < pause {
			return Event{}, last // what the service said, not a context error later
		}
		select {
		case <-s.ctx.Done():
			return Event{}, &UnavailableError{Op: "events", Err: s.ctx.Err()}
		case <-time.After(pause):
		}
		delay = min(2*delay, s.c.maxBackoff)
		// A stream that has returned no event has no id to resume from: its reopening follows
		// the events from then on, so those published while it was broken are not on it. It
		// is waited for until it follows, then said by a gap (re-read the state), as the
		// service says a resume it cannot serve in full.
		resumes := s.LastEventID() != ""
		refused, unopened = s.reconnect(!resumes)
		if unopened != nil && !IsUnavailable(unopened) {
			return Event{}, unopened
		}
		if unopened == nil && !resumes {
			s.failures = failures
			return Event{Type: EventGap, Time: time.Now().UTC(),
				Details: map[string]any{"reason": GapReopened}}, nil
		}
	}
}

// GapReopened is the reason of the gap Next returns when it reopened a stream that had
// returned no event yet: with no id to resume from, the reopened stream follows the events
// from then on, and those published while it was broken may be missing.
const GapReopened = "reopened"

// streamRetryAfterCap is the longest Retry-After a stream's reopening waits (a proxy may say
// an hour; the service's limit of streams says 5s).
const streamRetryAfterCap = 10 * time.Second

// notServing reports whether got is the service's own 503 "unavailable": it answered, and
// serves no event stream for now (its operator's start window: until the LockPolicy is
// applied, which may take as long as the store it names takes to answer). A proxy's 503
// page says nothing of the service: it counts against the attempts.
func notServing(got answer) bool {
	var e errorBody
	return got.status == http.StatusServiceUnavailable && json.Unmarshal(got.body, &e) == nil &&
		e.Reason == string(ReasonUnavailable)
}

func (s *EventStream) reconnect(untilFollowing bool) (answer, error) {
	s.mu.Lock()
	if s.body != nil {
		s.body.Close() //nolint:errcheck
		s.hangUp()
		s.body, s.reader, s.hangUp = nil, nil, nil
	}
	s.mu.Unlock()
	return s.connect(untilFollowing)
}

// read parses one SSE event (lines up to a blank line); comments and pings are skipped. A
// stream that sends no line for the client's stream silence is closed: an error, as a
// broken connection is.
func (s *EventStream) read() (Event, error) {
	s.mu.Lock()
	reader, body := s.reader, s.body
	s.mu.Unlock()
	if reader == nil {
		return Event{}, errStreamClosed
	}
	silence := s.c.streamSilence
	var silent atomic.Bool
	var timer *time.Timer
	if silence > 0 {
		timer = time.AfterFunc(silence, func() {
			silent.Store(true)
			body.Close() //nolint:errcheck
		})
		defer timer.Stop()
	}
	var id, kind string
	var data strings.Builder
	for {
		line, err := reader.ReadString('\n')
		if err != nil && silent.Load() {
			return Event{}, fmt.Errorf("the event stream sent nothing for %v, not even the "+
				"keep-alive the service sends every %v: given up", silence, KeepAlive)
		}
		if err != nil {
			return Event{}, err
		}
		if timer != nil {
			timer.Reset(silence)
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "" {
			if data.Len() == 0 && kind == "" {
				continue
			}
			ev := Event{ID: id, Type: kind}
			if data.Len() > 0 && kind != EventGap {
				if err := json.Unmarshal([]byte(data.String()), &ev); err != nil {
					return Event{}, fmt.Errorf("unreadable event %q: %w", id, err)
				}
			}
			if ev.ID == "" {
				ev.ID = id
			}
			if kind == EventGap && id == "" {
				// A gap is not a place to resume from: the stream stays where it was. A
				// store switch's gap names the new event bus's id: the stream resumes there.
				ev.ID = s.LastEventID()
			}
			return ev, nil
		}
		if strings.HasPrefix(line, ":") {
			continue
		}
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "id":
			id = value
		case "event":
			kind = value
		case "data":
			if data.Len() > 0 {
				data.WriteByte('\n')
			}
			data.WriteString(value)
		}
	}
}
