package client_test

import (
	"context"
	"errors"
	"testing"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
	"github.com/runatlantis/enhanced-locking/atlantis/internal/servicetest"
)

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
