package client

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"strings"
	"testing"
	"time"
)

// A deadlock answer as the service sends it to a caller who may not read one of the cycle's
// repositories (the service's own tests make it with per-repository rights).
const hiddenDeadlock = `{"acquired":false,"lockKey":"acme/infra/sub/b/frozen/","lock":null,
"reason":"deadlock","holder":null,"queuePosition":null,
"cycle":["acme/infra#1","(other repository)","acme/infra#1"],
"cycleOwners":[{"name":"acme/infra#1","repo":"acme/infra","pull":1},
{"name":"(other repository)","repo":null,"pull":null},
{"name":"acme/infra#1","repo":"acme/infra","pull":1}],
"hiddenOwners":1,"error":null}`

func TestADeadlockOwnerInAnotherRepositoryIsDecodedWithoutRepositoryOrPull(t *testing.T) {
	var answer acquireAnswer
	if err := json.Unmarshal([]byte(hiddenDeadlock), &answer); err != nil {
		t.Fatal(err)
	}
	var held *HeldError
	if !errors.As(answer.refused("acquire"), &held) || held.Reason != ReasonDeadlock {
		t.Fatalf("a deadlock answer should be a HeldError, got %+v", answer)
	}
	if held.HiddenOwners != 1 || len(held.CycleOwners) != 3 {
		t.Fatalf("one owner hidden of three, got %+v", held)
	}
	if other := held.CycleOwners[1]; other != (CycleOwner{Name: OtherRepository}) {
		t.Fatalf("the hidden owner should carry no repository or pull, got %+v", other)
	}
	if held.CycleOwners[0] != (CycleOwner{Name: "acme/infra#1", Repo: "acme/infra", Pull: 1}) {
		t.Fatalf("the caller's own owner should be whole, got %+v", held.CycleOwners[0])
	}
}

// The 409s that name no holder: a release whose key a project of a repository the caller may
// not read took, and a force-unlock that found the key taken by a hold it did not check.
func TestA409WithoutAHolderIsStillANotOwnerError(t *testing.T) {
	for _, body := range []string{
		`{"error":"lock acme/infra/sub/p/default/ is held by a project of another repository (one this caller may not read)","lockKey":"acme/infra/sub/p/default/","holder":null,"reason":"not-owned"}`,
		`{"error":"the lock on acme/infra/sub/p/default/ changed after it was read","lockKey":"acme/infra/sub/p/default/","reason":"changed"}`,
	} {
		err := refusal(call{op: "release", key: "acme/infra/sub/p/default/"},
			answer{status: 409, body: []byte(body)})
		var notOwner *NotOwnerError
		if !errors.As(err, &notOwner) || notOwner.Holder != nil || notOwner.Key != "acme/infra/sub/p/default/" {
			t.Fatalf("%s should be a NotOwnerError without a holder, got %#v", body, err)
		}
	}
}

func TestAURLThatIsRefusedIsNotShownWithItsPassword(t *testing.T) {
	for _, bad := range []string{"ftp://atlantis:pw-s3cret-77@127.0.0.1:4142",
		"http://atlantis:pw-s3cret-77@", "atlantis:pw-s3cret-77@127.0.0.1:4142"} {
		_, err := New(bad)
		var invalid *InvalidError
		if !errors.As(err, &invalid) || strings.Contains(err.Error(), "pw-s3cret-77") {
			t.Fatalf("New(%q) should refuse the URL without showing its password, got %v", bad, err)
		}
		if !strings.Contains(err.Error(), "127.0.0.1") && !strings.HasSuffix(bad, "@") {
			t.Fatalf("the refusal should still name the host: %v", err)
		}
	}
}

func TestANegativeBackoffRetriesWithoutWaitingInsteadOfPanicking(t *testing.T) {
	// Nothing listens at the address: a read is retried after each refused connection.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() //nolint:errcheck
	c, err := New("http://"+addr, WithRetries(3, -time.Second))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Get(ctx, "acme/infra/./default/"); !IsUnavailable(err) {
		t.Fatalf("an unreachable service should be unavailable after the retries, got %v", err)
	}
}
