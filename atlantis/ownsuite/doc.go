// Package ownsuite runs Atlantis's own tests of its lock databases (server/core/boltdb and
// server/core/redis, from the Atlantis module in the Go module cache) against the adapter.
//
// Nothing of Atlantis is kept in this repository: at test time the two test files are copied
// into a throw-away module, their constructors (newTestDB, newTestDB2, newTestRedis) are
// replaced by ones that return lockdb.New(service, <the database Atlantis's test built>), and
// `go test` runs them against a live `enhanced-locking serve`. Every other line of Atlantis's
// tests is theirs, unchanged.
package ownsuite
