// Package client is a typed, context-aware client of the lock service's HTTP API (v1).
//
// One Client is safe for concurrent use. Every call takes a context; its deadline bounds the
// whole call, retries included. Calls that are safe to repeat (reads, a refresh, a release
// that names its pull) are retried with jittered exponential backoff when the service cannot
// be reached or answers 502/503/504. An acquire is retried only when the service cannot have
// acted on it: no connection could be made, or the service turned it away before any work
// (its 503 with reason "overloaded": at its limit of requests in flight). After any other
// answer that is not the service's (a 502, a 504, a proxy's own 503), the service's 503 with
// reason "unavailable" (its store dropped, maybe after the step had run), or a connection
// lost once the request was sent, the service may have granted it and be giving the grant
// back because its caller went away: a retry answered with that same lock (the same pull
// asking again gets it back) would be told it holds a lock that the give-back then frees. The
// others (a release that names no pull, force-unlock, cancel, releasing a pull's locks) are
// sent once, because a repeat could free a lock that someone else took in between, or lose
// the list of what was released; they are sent again only when no connection could be made
// (nothing reached the service: an endpoint gone during a restart or a rollout). A connection
// refused, reset while being made or not answered in time (what a restart causes) is sent
// again for as long as the call's deadline allows, not a count of attempts; a host name that
// does not resolve is not (no restart mends it).
//
// A retry waits at least the answer's Retry-After (the overload 503 says 1s), and is not
// made when that wait would outrun the context's deadline: the call then answers the
// service's 503 at once, not a context error after the wait. A refusal (409, 4xx) is an
// answer and never retried, so a retry cannot hide one. The service answers "overloaded"
// for a call it turned away before any work, or whose work so far (a waiter it queued, when
// its store's pool ran out mid-call) it undoes as after an outage: no grant is left for the
// retry to meet twice.
//
// Refusals are typed errors (see errors.go): *HeldError, *NotOwnerError, *InvalidError,
// *DeniedError and *UnavailableError.
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// DefaultURL is where `enhanced-locking serve` listens unless told otherwise.
const DefaultURL = "http://127.0.0.1:4142"

// Client calls one lock service.
type Client struct {
	base        *url.URL
	http        *http.Client
	token       string
	tokenFile   *tokenFile
	attempts    int
	backoff     time.Duration
	maxBackoff  time.Duration
	callTimeout time.Duration
	// streamSilence: how long an event stream may send nothing (WithStreamSilence).
	streamSilence time.Duration
}

// Option configures a Client.
type Option func(*Client)

// WithHTTPClient sends the calls through hc (its Timeout should stay 0: waiting acquires and
// the event stream are long calls; bound calls with contexts or WithCallTimeout instead).
func WithHTTPClient(hc *http.Client) Option { return func(c *Client) { c.http = hc } }

// WithToken sends "Authorization: Bearer <token>" with every call. The token is never part
// of an error message.
func WithToken(token string) Option { return func(c *Client) { c.token = token } }

// WithTokenFile sends the token the file at path holds (surrounding whitespace trimmed), read
// again when the file changes (looked at most once a second): a Kubernetes ServiceAccount
// token mounted in the pod, which the kubelet rotates before it expires, keeps being the
// caller's. A file that cannot be read (or is empty) later keeps the token read last; New
// refuses one it cannot read at all (an *InvalidError naming the file, never a token).
// It takes the place of WithToken.
func WithTokenFile(path string) Option {
	return func(c *Client) { c.tokenFile = &tokenFile{path: path} }
}

// tokenFile is the token of WithTokenFile: what the file held when it was last read.
type tokenFile struct {
	path    string
	mu      sync.Mutex
	token   string
	stamp   tokenStamp
	checked time.Time
}

// tokenStamp is what a file's status said when it was read: a rewrite (or a Kubernetes
// volume's swap of its files) changes one of them.
type tokenStamp struct {
	modified time.Time
	size     int64
}

// tokenRecheck is how often a token file is looked at again, at most.
const tokenRecheck = time.Second

// current is the token to send: the file's, read again when it changed since the last look.
func (f *tokenFile) current() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if now := time.Now(); now.Sub(f.checked) >= tokenRecheck {
		f.checked = now
		_ = f.read() // a file that cannot be read now keeps the token read last
	}
	return f.token
}

// read takes the file's token if the file changed since it was last read; an error (naming
// the file, never its content) when it cannot be read or holds no token.
func (f *tokenFile) read() error {
	info, err := os.Stat(f.path)
	if err != nil {
		return fmt.Errorf("token file %s: %w", f.path, errors.Unwrap(err))
	}
	stamp := tokenStamp{modified: info.ModTime(), size: info.Size()}
	if stamp == f.stamp && f.token != "" {
		return nil
	}
	data, err := os.ReadFile(f.path)
	if err != nil {
		return fmt.Errorf("token file %s: %w", f.path, errors.Unwrap(err))
	}
	token := strings.TrimSpace(string(data))
	if token == "" {
		return fmt.Errorf("token file %s holds no token", f.path)
	}
	f.token, f.stamp = token, stamp
	return nil
}

// bearer is the Authorization header's value, "" when the client sends none.
func (c *Client) bearer() string {
	token := c.token
	if c.tokenFile != nil {
		token = c.tokenFile.current()
	}
	if token == "" {
		return ""
	}
	return "Bearer " + token
}

// WithRetries sets how many attempts a call that is safe to repeat gets (1: no retry), and
// the first delay between them (doubled each time, with jitter, up to 2s; below 0: none). A
// connection a restart refuses is tried again for the call's time instead (see restarting).
func WithRetries(attempts int, backoff time.Duration) Option {
	return func(c *Client) {
		c.attempts, c.backoff = max(attempts, 1), max(backoff, 0)
	}
}

// WithCallTimeout bounds each call that does not wait in a queue (an acquire with Wait gets
// Wait plus this bound), when the caller's context has no earlier deadline, and the wait for
// an event stream's answer (its headers; for Events, and a reopening with no event to resume
// after, its ": following" line too; the stream is then bound by WithStreamSilence).
// 0: unbounded.
func WithCallTimeout(d time.Duration) Option { return func(c *Client) { c.callTimeout = d } }

// KeepAlive is how often the service's event stream sends a keep-alive comment when it has
// nothing else to send.
const KeepAlive = 15 * time.Second

// WithStreamSilence is how long the event stream may send nothing at all, not even the
// service's keep-alive (every KeepAlive), before it is taken for broken: dropped and reopened
// as a broken connection is (EventStream.Next). Default four keep-alives (60s); 0: no bound.
func WithStreamSilence(d time.Duration) Option {
	return func(c *Client) { c.streamSilence = max(d, 0) }
}

// New returns a client of the service at baseURL (e.g. "http://127.0.0.1:4142").
func New(baseURL string, opts ...Option) (*Client, error) {
	base, err := url.Parse(strings.TrimRight(baseURL, "/"))
	if err != nil || (base.Scheme != "http" && base.Scheme != "https") || base.Host == "" {
		return nil, &InvalidError{Field: "url", Message: fmt.Sprintf(
			"url: expected http(s)://host:port of the lock service, got %q", withoutUserinfo(baseURL))}
	}
	c := &Client{
		base:          base,
		http:          &http.Client{Transport: http.DefaultTransport},
		attempts:      3,
		backoff:       100 * time.Millisecond,
		maxBackoff:    2 * time.Second,
		callTimeout:   30 * time.Second,
		streamSilence: 4 * KeepAlive,
	}
	for _, opt := range opts {
		opt(c)
	}
	if c.tokenFile != nil {
		c.tokenFile.checked = time.Now()
		if err := c.tokenFile.read(); err != nil {
			return nil, &InvalidError{Field: "token-file", Message: err.Error()}
		}
	}
	c.http = sameOriginRedirects(c.http)
	return c, nil
}

// sameOriginRedirects is hc (a copy: the caller's client is left as it was) following a
// redirect only within the origin (scheme, host and port) of the call it answers. Go's client
// keeps the Authorization header on a redirect to the same host name whatever its port or
// scheme, and to a subdomain: a redirect from whatever stands at the service's URL would carry
// the bearer token to another server of the host, or in plain http. The service itself never
// redirects; a redirect elsewhere is answered as an error naming where it points, unfollowed.
func sameOriginRedirects(hc *http.Client) *http.Client {
	guarded := *hc
	next := hc.CheckRedirect
	guarded.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		if from := via[0].URL; !sameOrigin(req.URL, from) {
			return fmt.Errorf("%w: %s://%s redirects to %s://%s; set the service's URL to "+
				"where it points", errOtherOrigin, from.Scheme, from.Host, req.URL.Scheme,
				req.URL.Host)
		}
		if next != nil {
			return next(req, via)
		}
		if len(via) >= 10 { // what Go's client does without a CheckRedirect of its own
			return errors.New("stopped after 10 redirects")
		}
		return nil
	}
	return &guarded
}

// errOtherOrigin is a redirect to another origin than the call's, not followed.
var errOtherOrigin = errors.New("a redirect to another origin is not followed (it would " +
	"carry the bearer token there)")

// sameOrigin reports whether a and b have the same scheme, host and port (a port left out
// is the scheme's own).
func sameOrigin(a, b *url.URL) bool {
	return strings.EqualFold(a.Scheme, b.Scheme) && strings.EqualFold(a.Hostname(), b.Hostname()) &&
		originPort(a) == originPort(b)
}

func originPort(u *url.URL) string {
	if port := u.Port(); port != "" {
		return port
	}
	if strings.EqualFold(u.Scheme, "https") {
		return "443"
	}
	return "80"
}

// withoutUserinfo is u without the user:password@ it may carry before its host, so that a
// refused URL can be shown (Atlantis logs the error) without the password.
func withoutUserinfo(u string) string {
	prefix, rest := "", u
	if i := strings.Index(u, "://"); i >= 0 {
		prefix, rest = u[:i+3], u[i+3:]
	}
	end := len(rest)
	if j := strings.IndexAny(rest, "/?#"); j >= 0 {
		end = j
	}
	if at := strings.LastIndex(rest[:end], "@"); at >= 0 {
		rest = rest[at+1:]
	}
	return prefix + rest
}

// URL is the service's base URL.
func (c *Client) URL() string { return c.base.String() }

// call is one API call: what to send, and whether sending it twice is harmless.
type call struct {
	op         string
	method     string
	path       string
	query      url.Values
	body       any
	key        string
	idempotent bool
	// unsentOnly: retried only when the service cannot have acted on the call (no
	// connection, or its overload 503): an acquire (see the package comment).
	unsentOnly bool
	// wait extends the call's own time bound (an acquire that waits in a queue).
	wait time.Duration
	// also lists the statuses besides 200 whose body is the answer (409: an acquire refused).
	also []int
	// absentOK: the service's 404 for key means nothing is there (an answer, not an error).
	absentOK bool
}

// answer is the service's reply: the status and the raw JSON body.
type answer struct {
	status      int
	body        []byte
	contentType string
	// retryAfter is the answer's Retry-After (0: none said).
	retryAfter time.Duration
	// grant is the answer's Lock-Grant (an acquire's 200: "new", "again" or "upgraded").
	grant Grant
}

func (c *Client) do(ctx context.Context, k call) (answer, error) {
	if c.callTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.callTimeout+k.wait)
		defer cancel()
	}
	var payload []byte
	if k.body != nil {
		var err error
		if payload, err = json.Marshal(k.body); err != nil {
			return answer{}, &InvalidError{Message: fmt.Sprintf("%s: cannot encode the request: %v", k.op, err), Key: k.key}
		}
	}
	var bound time.Duration // the call's time, for the error that says it ran out
	if deadline, ok := ctx.Deadline(); ok {
		bound = time.Until(deadline)
	}
	delay := c.backoff
	var last error
	for attempt := 1; ; attempt++ {
		got, err := c.send(ctx, k, payload)
		if err == nil && (!retryableStatus(got.status) || slices.Contains(k.also, got.status)) {
			return got, nil
		}
		if err != nil {
			last = unanswered(k, err, bound)
		} else {
			last = &UnavailableError{Op: k.op, Key: k.key, Status: got.status, Message: errorMessage(got.body)}
		}
		// A connection a restart refused is tried again for as long as the call's time allows
		// (the pauses below stop at its deadline), not a count: a restart or a rollout closes
		// the service's port for seconds. Without a deadline the count bounds it too.
		_, timed := ctx.Deadline()
		windowed := timed && err != nil && restarting(err)
		if (attempt >= c.attempts && !windowed) || ctx.Err() != nil || !mayRepeat(k, got, err) ||
			errors.Is(err, errOtherOrigin) { // the same redirect again: no retry cures it
			return answer{}, last
		}
		if windowed {
			// Tried for a time, not a count: never without a pause (WithRetries(n, 0) would
			// dial a closed port in a tight loop until the deadline).
			delay = max(delay, restartBackoff)
		}
		// Full jitter: a random delay up to the current bound, so clients spread out; never
		// sooner than the answer's Retry-After (the service's overload 503 says 1s).
		pause := max(time.Duration(rand.Int64N(int64(delay)+1)), got.retryAfter)
		if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) < pause {
			// The pause would outrun the call's time: what the service said now, not a
			// context error later.
			return answer{}, last
		}
		select {
		case <-ctx.Done():
			return answer{}, unanswered(k, ctx.Err(), bound)
		case <-time.After(pause):
		}
		delay = min(2*delay, c.maxBackoff)
	}
}

// unanswered is the *UnavailableError of a call that got no answer (err). When its time ran
// out, the error says so with the time it had (what Atlantis shows in the pull request's
// comment says more than Go's "context deadline exceeded"), and whether a connection was made.
func unanswered(k call, err error, bound time.Duration) *UnavailableError {
	e := &UnavailableError{Op: k.op, Key: k.key, Err: err}
	if bound > 0 && errors.Is(err, context.DeadlineExceeded) {
		within := bound.Round(10 * time.Millisecond)
		if bound >= time.Second {
			within = bound.Round(time.Second)
		}
		if notConnected(err) {
			e.Message = fmt.Sprintf("no connection to the lock service could be made within %s", within)
		} else {
			e.Message = fmt.Sprintf("the lock service did not answer within %s: given up (it, "+
				"or a proxy between, took the call and sent nothing back)", within)
		}
	}
	return e
}

// mayRepeat reports whether a call whose attempt failed (err, or got) may be sent again: one
// safe to repeat after any failure; an acquire only when the service cannot have acted on it
// (unsent); any other (sent once: a repeat after the service acted could free a lock another
// pull took in between, or lose the list of what was freed) only when no connection was
// made, so nothing reached the service and the next attempt is the first it sees.
func mayRepeat(k call, got answer, err error) bool {
	switch {
	case k.unsentOnly:
		return unsent(got, err)
	case k.idempotent:
		return true
	default:
		return notConnected(err)
	}
}

// unsent reports whether an attempt that failed (err, or got) cannot have been acted on by the
// service: no connection was made, or the service shed it before any work (503, reason
// "overloaded"). A 503 that says less proves nothing: the service's "unavailable" can follow
// a step that ran, and a proxy may answer 503 after it passed the request on.
func unsent(got answer, err error) bool {
	if err == nil {
		if got.status != http.StatusServiceUnavailable {
			return false
		}
		var e errorBody
		return json.Unmarshal(got.body, &e) == nil && e.Reason == reasonOverloaded
	}
	return notConnected(err)
}

// notConnected reports whether err says no connection to the service could be made (the
// request was never written).
func notConnected(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// restartBackoff is the least first bound of the pauses between attempts whose connection a
// restart refused.
const restartBackoff = 100 * time.Millisecond

// restarting reports whether err is a connection that could not be made as a restart or a
// rollout of the service makes it fail: its port refuses or resets the connection being made,
// or the connect gets no answer in time. Not a host name that does not resolve, which no
// restart mends (nor a TLS handshake refused, which is no dial failure: it is never retried).
func restarting(err error) bool {
	var dns *net.DNSError
	if !notConnected(err) || errors.As(err, &dns) {
		return false
	}
	var op *net.OpError
	errors.As(err, &op)
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) || op.Timeout()
}

// reasonOverloaded is the reason of the service's 503 sent before any work (its limit of
// requests in flight).
const reasonOverloaded = "overloaded"

func retryableStatus(status int) bool {
	return status == http.StatusBadGateway || status == http.StatusServiceUnavailable ||
		status == http.StatusGatewayTimeout
}

func (c *Client) endpoint(p string, query url.Values) string {
	u := *c.base
	u.Path = strings.TrimRight(c.base.Path, "/") + p
	if len(query) > 0 {
		u.RawQuery = query.Encode()
	}
	return u.String()
}

func (c *Client) send(ctx context.Context, k call, payload []byte) (answer, error) {
	var body io.Reader
	if payload != nil {
		body = bytes.NewReader(payload)
	}
	req, err := http.NewRequestWithContext(ctx, k.method, c.endpoint(k.path, k.query), body)
	if err != nil {
		return answer{}, err
	}
	req.Header.Set("Accept", "application/json")
	if payload != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if bearer := c.bearer(); bearer != "" {
		req.Header.Set("Authorization", bearer)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return answer{}, err
	}
	defer resp.Body.Close() //nolint:errcheck
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return answer{}, err
	}
	return answer{status: resp.StatusCode, body: data, contentType: resp.Header.Get("Content-Type"),
		retryAfter: retryAfter(resp.Header.Get("Retry-After")), grant: Grant(resp.Header.Get(grantHeader))}, nil
}

// retryAfter is a Retry-After header's delay: whole seconds (what the service sends) or an
// HTTP date; 0 when there is none or it cannot be read.
func retryAfter(header string) time.Duration {
	if header == "" {
		return 0
	}
	if seconds, err := strconv.Atoi(strings.TrimSpace(header)); err == nil {
		return max(time.Duration(seconds)*time.Second, 0)
	}
	if when, err := http.ParseTime(header); err == nil {
		return max(time.Until(when), 0)
	}
	return 0
}

// errorBody is every error answer: a human-readable "error" and what it is about.
type errorBody struct {
	Error   string `json:"error"`
	Field   string `json:"field"`
	LockKey string `json:"lockKey"`
	Holder  *Lock  `json:"holder"`
	Reason  string `json:"reason"`
	Detail  any    `json:"detail"`
	Verb    string `json:"verb"`
}

func errorMessage(body []byte) string {
	var e errorBody
	if json.Unmarshal(body, &e) == nil && e.Error != "" {
		return e.Error
	}
	text := strings.TrimSpace(string(body))
	if len(text) > 200 {
		text = text[:200] + "..."
	}
	return text
}

// refusal turns an answer that is not a success into its typed error.
func refusal(k call, got answer) error {
	var e errorBody
	_ = json.Unmarshal(got.body, &e)
	message := e.Error
	if message == "" {
		message = errorMessage(got.body)
	}
	key := k.key
	if e.LockKey != "" {
		key = e.LockKey
	}
	switch {
	case got.status == http.StatusUnauthorized || got.status == http.StatusForbidden:
		return &DeniedError{Status: got.status, Message: message, Verb: e.Verb}
	case got.status == http.StatusConflict && (e.Holder != nil || e.Reason == "not-owned" || e.Reason == "changed"):
		// Held by another pull; without Holder when it is a repository the caller may not
		// read, or when a force-unlock found the key taken by a hold it did not check.
		return &NotOwnerError{Key: key, Holder: e.Holder, Message: message}
	case got.status >= 500 || got.status == http.StatusTooManyRequests || e.Reason == string(ReasonUnavailable):
		return &UnavailableError{Op: k.op, Key: key, Status: got.status, Message: message}
	default:
		return &InvalidError{Status: got.status, Field: e.Field, Message: message, Key: key}
	}
}

func decode[T any](k call, got answer) (T, error) {
	var out T
	if err := json.Unmarshal(got.body, &out); err != nil {
		return out, &UnavailableError{Op: k.op, Key: k.key, Status: got.status,
			Message: fmt.Sprintf("unreadable answer: %v", err)}
	}
	return out, nil
}

// exchange sends k and sorts its answer: 200 (or a status in k.also) is found; the
// service's own 404 for k.key where k.absentOK is not found and no error; any other status
// is its typed refusal.
func (c *Client) exchange(ctx context.Context, k call) (got answer, found bool, err error) {
	if got, err = c.do(ctx, k); err != nil {
		return answer{}, false, err
	}
	switch {
	case got.status == http.StatusOK || slices.Contains(k.also, got.status):
		return got, true, nil
	case k.absentOK && got.status == http.StatusNotFound && absent(k, got.body):
		return got, false, nil
	case k.absentOK && got.status == http.StatusNotFound:
		// A 404 that is not the service's answer for the key (a wrong base path, a proxy's
		// page): nothing is known of the lock, so it is not read as "no lock".
		return got, false, &UnavailableError{Op: k.op, Key: k.key, Status: got.status,
			Message: "404 that is not the lock service's answer for the key (is the URL's path " +
				"the service's?): " + errorMessage(got.body)}
	default:
		return got, false, refusal(k, got)
	}
}

// absent reports whether body is the service's 404 for k.key: its JSON error naming the key
// ({"error": "no lock is held on ...", "lockKey": key}).
func absent(k call, body []byte) bool {
	var e errorBody
	return json.Unmarshal(body, &e) == nil && e.Error != "" && e.LockKey == k.key && k.key != ""
}

// request is one call whose answer is a T (see exchange): the zero T when nothing is there.
func request[T any](ctx context.Context, c *Client, k call) (T, error) {
	got, found, err := c.exchange(ctx, k)
	if err != nil || !found {
		var none T
		return none, err
	}
	return decode[T](k, got)
}

// goDuration writes d in Go form, as the API wants ("30s", "1m30s").
func goDuration(d time.Duration) string { return d.String() }

type acquireBody struct {
	Project   Project  `json:"project"`
	Workspace string   `json:"workspace,omitempty"`
	Pull      Pull     `json:"pull"`
	User      User     `json:"user"`
	Priority  Priority `json:"priority,omitempty"`
	Wait      string   `json:"wait,omitempty"`
	TTL       string   `json:"ttl,omitempty"`
	RequestID string   `json:"requestId,omitempty"`
}

type batchBody struct {
	Locks     []BatchItem `json:"locks"`
	Pull      Pull        `json:"pull"`
	User      User        `json:"user"`
	Priority  Priority    `json:"priority,omitempty"`
	Wait      string      `json:"wait,omitempty"`
	TTL       string      `json:"ttl,omitempty"`
	RequestID string      `json:"requestId,omitempty"`
}

type acquireAnswer struct {
	Acquired      bool         `json:"acquired"`
	LockKey       string       `json:"lockKey"`
	Lock          *Lock        `json:"lock"`
	Locks         []Lock       `json:"locks"`
	Reason        Reason       `json:"reason"`
	Holder        *Lock        `json:"holder"`
	QueuePosition *int         `json:"queuePosition"`
	Cycle         []string     `json:"cycle"`
	CycleOwners   []CycleOwner `json:"cycleOwners"`
	HiddenOwners  *int         `json:"hiddenOwners"`
	Error         string       `json:"error"`
}

func (a acquireAnswer) refused(op string) error {
	if a.Reason == ReasonUnavailable {
		message := "the lock store did not answer and the service fails closed"
		if a.Error != "" { // the service's own words: which store, or why it grants nothing now
			message = a.Error
		}
		return &UnavailableError{Op: op, Key: a.LockKey, Status: http.StatusConflict, Message: message}
	}
	held := &HeldError{Key: a.LockKey, Reason: a.Reason, Holder: a.Holder, Cycle: a.Cycle,
		CycleOwners: a.CycleOwners, Message: a.Error}
	if a.QueuePosition != nil {
		held.QueuePosition = *a.QueuePosition
	}
	if a.HiddenOwners != nil {
		held.HiddenOwners = *a.HiddenOwners
	}
	return held
}

func users(u User) User {
	if u.Teams == nil {
		u.Teams = []string{}
	}
	return u
}

func (r AcquireRequest) body() acquireBody {
	b := acquireBody{Project: r.Project, Workspace: r.Workspace, Pull: r.Pull, User: users(r.User),
		Priority: r.Priority, RequestID: r.RequestID}
	if b.Project.Path == "" {
		b.Project.Path = "."
	}
	if r.Wait > 0 {
		b.Wait = goDuration(r.Wait)
	}
	if r.TTL > 0 {
		b.TTL = goDuration(r.TTL)
	}
	return b
}

// Acquire asks for one lock. Granted: the lock. Not granted: a *HeldError with the reason
// and the holder. Retried only when the service cannot have acted on it (see the package
// comment): after a 502, a 504 or a connection lost mid-call it answers an *UnavailableError,
// and a grant its caller never heard of is given back by the service.
func (c *Client) Acquire(ctx context.Context, r AcquireRequest) (*Lock, error) {
	k := call{op: "acquire", method: http.MethodPost, path: "/v1/locks", body: r.body(),
		key: LockKey(r.Project, r.Workspace), idempotent: true, unsentOnly: true, wait: r.Wait,
		also: []int{http.StatusConflict}}
	got, _, err := c.exchange(ctx, k)
	if err != nil {
		return nil, err
	}
	a, err := decode[acquireAnswer](k, got)
	if err != nil {
		return nil, err
	}
	if !a.Acquired || a.Lock == nil {
		return nil, a.refused(k.op)
	}
	a.Lock.Grant = got.grant
	return a.Lock, nil
}

// AcquireBatch asks for several locks of one pull, all or nothing; while it waits it holds
// none of them. Not granted: a *HeldError naming the key that blocked it.
func (c *Client) AcquireBatch(ctx context.Context, r BatchRequest) ([]Lock, error) {
	one := AcquireRequest{Pull: r.Pull, User: r.User, Priority: r.Priority, Wait: r.Wait,
		TTL: r.TTL, RequestID: r.RequestID}.body()
	body := batchBody{Pull: one.Pull, User: one.User, Priority: one.Priority, Wait: one.Wait,
		TTL: one.TTL, RequestID: one.RequestID, Locks: make([]BatchItem, len(r.Locks))}
	for i, item := range r.Locks {
		if item.Workspace == "" {
			item.Workspace = "default"
		}
		if item.Project.Path == "" {
			item.Project.Path = "."
		}
		body.Locks[i] = item
	}
	k := call{op: "acquire-batch", method: http.MethodPost, path: "/v1/locks/batch", body: body,
		idempotent: true, unsentOnly: true, wait: r.Wait, also: []int{http.StatusConflict}}
	got, _, err := c.exchange(ctx, k)
	if err != nil {
		return nil, err
	}
	a, err := decode[acquireAnswer](k, got)
	if err != nil {
		return nil, err
	}
	if !a.Acquired {
		return nil, a.refused(k.op)
	}
	// The batch's Lock-Grant has one word a lock of Locks, in their order ("new, again"); a
	// header that does not say it lock by lock leaves every Grant "" (not said).
	if words := strings.Split(string(got.grant), ","); len(words) == len(a.Locks) {
		for i, word := range words {
			if grant := Grant(strings.TrimSpace(word)); grant == GrantNew || grant == GrantAgain ||
				grant == GrantUpgraded {
				a.Locks[i].Grant = grant
			}
		}
	}
	return a.Locks, nil
}

type lockAnswer struct {
	Lock *Lock `json:"lock"`
}

// Get is the lock held on key, or nil when the key is free.
func (c *Client) Get(ctx context.Context, key string) (*Lock, error) {
	a, err := request[lockAnswer](ctx, c, call{op: "get", method: http.MethodGet,
		path: "/v1/locks/by-key", query: url.Values{"key": {key}}, key: key, idempotent: true,
		absentOK: true})
	return a.Lock, err
}

type locksAnswer struct {
	Locks       []Lock   `json:"locks"`
	Unavailable []string `json:"unavailable"`
	Unreadable  []struct {
		Key string `json:"key"`
	} `json:"unreadable"`
}

// partial is the *UnavailableError of an answer that the service gave without the sides
// (stores) it names in unavailable: a list missing their locks, a release that left theirs
// held. Nil when every side answered.
func partial(op string, unavailable []string) error {
	if len(unavailable) == 0 {
		return nil
	}
	return &UnavailableError{Op: op, Status: http.StatusOK, Sides: unavailable, Message: fmt.Sprintf(
		"the %s lock store did not answer: the answer is partial", strings.Join(unavailable, " and "))}
}

// List is every held lock, optionally of one repository (exact) and/or pull. When a lock
// store behind the service did not answer, the locks of the others come with an
// *UnavailableError naming it (Sides): the list is partial. Stored locks that cannot be read
// (held until a force-unlock clears them) make it an *UnreadableError naming their keys,
// with the readable locks.
func (c *Client) List(ctx context.Context, f ListFilter) ([]Lock, error) {
	q := url.Values{}
	if f.Repo != "" {
		q.Set("repo", f.Repo)
	}
	if f.Pull != nil {
		q.Set("pull", strconv.Itoa(*f.Pull))
	}
	a, err := request[locksAnswer](ctx, c, call{op: "list", method: http.MethodGet,
		path: "/v1/locks", query: q, idempotent: true})
	if err != nil {
		return nil, err
	}
	var unreadable error
	if len(a.Unreadable) > 0 {
		keys := make([]string, 0, len(a.Unreadable))
		for _, entry := range a.Unreadable {
			keys = append(keys, entry.Key)
		}
		unreadable = &UnreadableError{Keys: keys}
	}
	return a.Locks, errors.Join(partial("list", a.Unavailable), unreadable)
}

type releaseAnswer struct {
	Released bool  `json:"released"`
	Lock     *Lock `json:"lock"`
}

func (c *Client) release(ctx context.Context, k call) (*Lock, error) {
	k.absentOK = true
	a, err := request[releaseAnswer](ctx, c, k)
	return a.Lock, err
}

// Release frees the lock on key whoever holds it (Atlantis's unlock). It answers the lock
// it freed, or nil when the key was free. Sent once (again only when no connection could be
// made): a repeat could free a lock that another pull took in between.
func (c *Client) Release(ctx context.Context, key string) (*Lock, error) {
	return c.release(ctx, call{op: "release", method: http.MethodDelete, path: "/v1/locks/by-key",
		query: url.Values{"key": {key}}, key: key})
}

// ReleaseIfOwned frees the lock on key only if pull (of the lock's repository) holds it;
// another pull's lock answers a *NotOwnerError. Nil when the key was free.
func (c *Client) ReleaseIfOwned(ctx context.Context, key string, pull int) (*Lock, error) {
	return c.release(ctx, call{op: "release", method: http.MethodDelete, path: "/v1/locks/by-key",
		query: url.Values{"key": {key}, "pull": {strconv.Itoa(pull)}}, key: key, idempotent: true})
}

// ReleaseIfOwnedIn is ReleaseIfOwned of a pull of repo: a lock of another repository's
// project whose parts join to the same key (GitLab's grp/sub + proj/x and grp/sub/proj + x),
// whose pull can have the same number, answers a *NotOwnerError and stays held.
func (c *Client) ReleaseIfOwnedIn(ctx context.Context, key, repo string, pull int) (*Lock, error) {
	return c.release(ctx, call{op: "release", method: http.MethodDelete, path: "/v1/locks/by-key",
		query: url.Values{"key": {key}, "pull": {strconv.Itoa(pull)}, "repo": {repo}}, key: key,
		idempotent: true})
}

// ForceUnlock frees the lock on key whoever holds it and serves its queue (an admin call).
// Nil when the key was free. reason says why, and is kept in the audit trail: a service with
// access control on refuses a force-unlock without one (an *InvalidError naming "reason").
func (c *Client) ForceUnlock(ctx context.Context, key, reason string) (*Lock, error) {
	query := url.Values{"key": {key}}
	if reason != "" {
		query.Set("reason", reason)
	}
	return c.release(ctx, call{op: "force-unlock", method: http.MethodPost,
		path: "/v1/admin/force-unlock", query: query, key: key})
}

type pullReleaseAnswer struct {
	Released    []Lock   `json:"released"`
	Cancelled   []string `json:"cancelled"`
	Unavailable []string `json:"unavailable"`
}

// PullRelease is what releasing a pull's locks did: the locks it freed and the pull's queued
// requests it dropped (their waiter ids; each waiting caller is answered ReasonCancelled).
type PullRelease struct {
	Released  []Lock
	Cancelled []string
}

// ReleasePull frees every lock of one pull of one repository (exactly that repository: not
// another whose name starts the same) and answers them. The pull's requests still queued are
// dropped first (ReleasePullQueued says which). When a lock store behind the service did not
// answer, the locks freed on the others come with an *UnavailableError naming it (Sides):
// the pull's locks there are still held, and the call is to be made again once it answers.
func (c *Client) ReleasePull(ctx context.Context, repo string, pull int) ([]Lock, error) {
	done, err := c.ReleasePullQueued(ctx, repo, pull)
	return done.Released, err
}

// ReleasePullQueued is ReleasePull answering also the queued requests it dropped.
func (c *Client) ReleasePullQueued(ctx context.Context, repo string, pull int) (PullRelease, error) {
	a, err := request[pullReleaseAnswer](ctx, c, call{op: "release-pull",
		method: http.MethodDelete, path: "/v1/locks/by-pull",
		query: url.Values{"repo": {repo}, "pull": {strconv.Itoa(pull)}}})
	if err != nil {
		return PullRelease{}, err
	}
	return PullRelease{Released: a.Released, Cancelled: a.Cancelled},
		partial("release-pull", a.Unavailable)
}

// ReleaseBatch frees several locks; with pull, only if that pull holds every held one; with
// repo (not ""), only if each held one is that repository's: a lock of another repository's
// project whose parts join to the same key answers a *NotOwnerError and nothing is freed.
// The repository is also what the call is judged on when no key is held (per-repository
// rights).
func (c *Client) ReleaseBatch(ctx context.Context, keys []string, repo string, pull *int) (BatchRelease, error) {
	q := url.Values{"key": keys}
	if pull != nil {
		q.Set("pull", strconv.Itoa(*pull))
	}
	if repo != "" {
		q.Set("repo", repo)
	}
	return request[BatchRelease](ctx, c, call{op: "release-batch", method: http.MethodDelete,
		path: "/v1/locks/batch", query: q, idempotent: pull != nil})
}

type refreshBody struct {
	Key  string `json:"key"`
	Repo string `json:"repo,omitempty"`
	Pull int    `json:"pull"`
	TTL  string `json:"ttl,omitempty"`
}

// Refresh extends the lease of the lock on key, held by pull of repo, to now + ttl (0: the
// service's lock-ttl). A free key answers nil and no error; another pull's lock, or a lock of
// another repository's project whose parts join to the same key, a *NotOwnerError. (repo ""
// sends none: the holder's repository is taken for the pull's.)
func (c *Client) Refresh(ctx context.Context, key, repo string, pull int, ttl time.Duration) (*Lock, error) {
	body := refreshBody{Key: key, Repo: repo, Pull: pull}
	if ttl > 0 {
		body.TTL = goDuration(ttl)
	}
	a, err := request[lockAnswer](ctx, c, call{op: "refresh", method: http.MethodPost,
		path: "/v1/locks/refresh", body: body, key: key, idempotent: true, absentOK: true})
	return a.Lock, err
}

// EndLease ends the lease of the lock on key, held by pull of repo: the lock is kept until it
// is released, as one granted without a lease (a refresh to ttl 0s). Answers as Refresh; a
// service of the release before it took a ttl of 0s refuses it (an *InvalidError, status 422,
// Field "ttl").
func (c *Client) EndLease(ctx context.Context, key, repo string, pull int) (*Lock, error) {
	a, err := request[lockAnswer](ctx, c, call{op: "refresh", method: http.MethodPost,
		path: "/v1/locks/refresh", body: refreshBody{Key: key, Repo: repo, Pull: pull, TTL: "0s"},
		key: key, idempotent: true, absentOK: true})
	return a.Lock, err
}

// Queue is the holder of key and its waiters in service order.
func (c *Client) Queue(ctx context.Context, key string) (*Queue, error) {
	q, err := request[Queue](ctx, c, call{op: "queue", method: http.MethodGet,
		path: "/v1/queue", query: url.Values{"key": {key}}, key: key, idempotent: true})
	if err != nil {
		return nil, err
	}
	return &q, nil
}

// Cancel takes a queued request (by its waiter id or its RequestID) out of key's queue; the
// request is answered "cancelled". False when no such request is queued.
func (c *Client) Cancel(ctx context.Context, key, id string) (bool, error) {
	_, found, err := c.exchange(ctx, call{op: "cancel", method: http.MethodDelete,
		path: "/v1/queue", query: url.Values{"key": {key}, "id": {id}}, key: key, absentOK: true})
	return found, err
}

// Known answers nil when the service knows the caller: its token is accepted, or the service
// asks for none. A missing, unknown or expired token is a *DeniedError with Status 401, as
// every lock call would answer. It asks GET /v1/config, the cheapest call that needs a caller;
// a 403 there (a role that may not read the configuration) is a known caller too. Whether the
// caller may lock is not checked: only a lock call says that.
func (c *Client) Known(ctx context.Context) error {
	_, _, err := c.exchange(ctx, call{op: "check the token", method: http.MethodGet,
		path: "/v1/config", idempotent: true, also: []int{http.StatusForbidden}})
	return err
}

// Ready checks that the service and every store it uses answer (GET /readyz). A 200 that is
// not the service's JSON answer (a proxy's sign-in page, another web server at the URL) is an
// *UnavailableError: the lock calls would all fail there. The service's own 503, a store that
// did not answer, is an *UnavailableError whose Sides names the stores ("legacy",
// "enhanced"), and its 503 for locks it withholds for now one whose Withheld says why: the
// service itself answered.
//
// A connection that cannot be made is tried again as any call's is (see the package comment:
// for its time when a restart refuses it), so a restart or a rollout of the service shorter
// than the context's time is not an error; the service's own 503 is its answer, not retried.
func (c *Client) Ready(ctx context.Context) error {
	k := call{op: "ready", method: http.MethodGet, path: "/readyz", idempotent: true,
		also: []int{http.StatusServiceUnavailable}}
	got, err := c.do(ctx, k)
	if err != nil {
		return err
	}
	if got.status != http.StatusOK {
		if got.status == http.StatusServiceUnavailable {
			sides, withheld := notReady(got.body)
			return &UnavailableError{Op: k.op, Status: got.status, Sides: sides, Withheld: withheld,
				Message: string(bytes.TrimSpace(got.body))}
		}
		return refusal(k, got)
	}
	var answer map[string]any
	if json.Unmarshal(got.body, &answer) != nil {
		return &UnavailableError{Op: k.op, Status: got.status, Message: fmt.Sprintf(
			"GET %s answered 200 with %s, not the lock service's JSON: is the URL the service's?",
			k.path, contentType(got.contentType))}
	}
	return nil
}

// notReady is what a /readyz answer says keeps the service from being ready: the stores it
// names as not answering, in order, and why it withholds its locks ("" when it does not);
// nothing when the body is not the service's readiness (a proxy's 503 page).
func notReady(body []byte) ([]string, string) {
	var answer struct {
		Backends map[string]string `json:"backends"`
		Withheld string            `json:"withheld"`
	}
	if json.Unmarshal(body, &answer) != nil {
		return nil, ""
	}
	var sides []string
	for side, state := range answer.Backends {
		if state != "ok" {
			sides = append(sides, side)
		}
	}
	slices.Sort(sides)
	return sides, answer.Withheld
}

// contentType is a response's media type without its parameters, or "no content type".
func contentType(header string) string {
	kind, _, _ := strings.Cut(header, ";")
	if kind = strings.TrimSpace(kind); kind == "" {
		return "no content type"
	}
	return kind
}

var errStreamClosed = errors.New("event stream closed")
