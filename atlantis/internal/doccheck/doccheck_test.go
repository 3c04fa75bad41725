package doccheck_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/runatlantis/enhanced-locking/atlantis/internal/servicetest"
)

var goBlock = regexp.MustCompile("(?s)```go\n(.*?)```")

// fragmentWrapper makes a snippet that is a function body into a package.
const fragmentWrapper = `package main

import (
	"context"
	"errors"
	"log"
	"time"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
)

func example(ctx context.Context, token string) error {
%s
	return nil
}

func main() { _ = example }
`

// TestTheDocsGoExamplesCompile builds every Go block of docs/07-atlantis-go.md against this
// module, as a reader pasting them would: a whole program as is, a fragment as a function's
// body.
func TestTheDocsGoExamplesCompile(t *testing.T) {
	root := servicetest.RepoRoot(t)
	doc, err := os.ReadFile(filepath.Join(root, "docs", "07-atlantis-go.md"))
	if err != nil {
		t.Fatal(err)
	}
	blocks := goBlock.FindAllStringSubmatch(string(doc), -1)
	if len(blocks) < 2 {
		t.Fatalf("docs/07-atlantis-go.md should have its Go examples, found %d", len(blocks))
	}
	module := filepath.Join(root, "atlantis")
	sums, err := os.ReadFile(filepath.Join(module, "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	for i, block := range blocks {
		src := block[1]
		if !strings.HasPrefix(src, "package ") {
			src = strings.Replace(fragmentWrapper, "%s", src, 1)
		}
		work := t.TempDir()
		gomod := "module enhancedlocking.test/docexample\n\ngo 1.26.5\n\nrequire (\n" +
			"\tgithub.com/runatlantis/atlantis v0.47.1\n\tgithub.com/runatlantis/enhanced-locking/atlantis v0.0.0\n)\n\n" +
			"replace github.com/runatlantis/enhanced-locking/atlantis => " + module + "\n"
		for name, content := range map[string][]byte{"go.mod": []byte(gomod), "go.sum": sums, "main.go": []byte(src)} {
			if err := os.WriteFile(filepath.Join(work, name), content, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		cmd := exec.Command("go", "vet", ".")
		cmd.Dir = work
		cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("Go example %d of docs/07-atlantis-go.md does not compile: %v\n%s\n%s", i+1, err, out, src)
		}
	}
}
