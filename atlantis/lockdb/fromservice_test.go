package lockdb

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
)

// A lock method's error names the lock service once: an unavailable service and a refused
// caller say so in their own words; any other error from the client gets the name, also when
// the service's words (a key, a path) happen to contain it.
func TestAServiceErrorNamesTheLockServiceOnce(t *testing.T) {
	for _, c := range []struct {
		err    error
		prefix bool
	}{
		{&client.UnavailableError{Op: "acquire", Message: "no store answered"}, false},
		{&client.DeniedError{Status: 403, Message: "not allowed to lock"}, false},
		{fmt.Errorf("the %w: %w", errLeaseCannotEnd, &client.InvalidError{Status: 422, Field: "ttl"}), false},
		{&client.InvalidError{Status: 422, Message: "path 'lock service/prod' is not clean"}, true},
		{&client.HeldError{Key: "acme/infra/lock service/default", Reason: client.ReasonCancelled}, true},
		{errors.New("decoding the answer: unexpected EOF"), true},
	} {
		got := fromService(c.err)
		if !errors.Is(got, c.err) {
			t.Fatalf("%v: the client's error should stay wrapped, got %v", c.err, got)
		}
		if has := strings.HasPrefix(got.Error(), "lock service: "); has != c.prefix {
			t.Fatalf("%q: prefixed %v, want %v", got.Error(), has, c.prefix)
		}
	}
}
