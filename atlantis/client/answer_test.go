package client

import (
	"encoding/json"
	"errors"
	"testing"
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
