// Package realatlantis tests one lock space shared by the service and the real Atlantis
// server binary (v0.47.1, built from the Go module proxy by hack/build-atlantis.sh): both on
// one Redis, Atlantis with --locking-db-type=redis and the service's legacy store in
// Atlantis's own Redis layout. Atlantis talks only to loopback: its VCS is a small GitLab
// stand-in on 127.0.0.1 that answers the version call and records comments.
package realatlantis
