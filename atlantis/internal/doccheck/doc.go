// Package doccheck holds the test that compiles the Go examples of docs/07-atlantis-go.md.
package doccheck
