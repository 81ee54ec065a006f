// Package archtest checks which packages link which, for the tests that keep the layering
// true: shipped binaries free of test-only code, dps and hub free of the TPM stack, and
// docs/architecture.md's package table equal to the imports. It is for tests only.
package archtest

import (
	"bytes"
	"errors"
	"os/exec"
	"strings"
	"testing"
)

// Deps lists the packages that pkgs link, themselves included, as `go list -deps` run in
// the current directory sees them.
func Deps(t testing.TB, pkgs ...string) []string {
	t.Helper()
	out := goList(t, append([]string{"-deps"}, pkgs...)...)
	deps := strings.Fields(string(out))
	// Even the smallest of our packages links dozens from the standard library: fewer
	// means the listing went wrong, and a check against it would pass for nothing.
	if len(deps) < 20 {
		t.Fatalf("go list -deps %s listed only %d packages: %q", strings.Join(pkgs, " "), len(deps), deps)
	}
	return deps
}

// NotLinked fails t for each package that pkgs link (see Deps) and that is one of denied or
// below one of them.
func NotLinked(t testing.TB, pkgs []string, denied ...string) {
	t.Helper()
	deps := Deps(t, pkgs...)
	for _, d := range denied {
		for _, linked := range within(deps, d) {
			t.Errorf("%s links %s", strings.Join(pkgs, " and "), linked)
		}
	}
}

// within returns the packages of deps that are pkg or below it.
func within(deps []string, pkg string) []string {
	var found []string
	for _, d := range deps {
		if d == pkg || strings.HasPrefix(d, pkg+"/") {
			found = append(found, d)
		}
	}
	return found
}

func goList(t testing.TB, args ...string) []byte {
	t.Helper()
	cmd := exec.Command("go", append([]string{"list"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			t.Fatalf("go list %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
		}
		t.Fatalf("go list %s: %v", strings.Join(args, " "), err)
	}
	return out
}
