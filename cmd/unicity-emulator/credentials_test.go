package main

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

// The certificate management commands keep the exit codes of the others: 0 for --help, 2 for
// a usage error (before any emulator is asked), 1 when none serves the directory.
func TestCredentialCommandsExitCodes(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		code int
	}{
		{[]string{"policy", "--help"}, 0},
		{[]string{"revoke", "--help"}, 0},
		{[]string{"renewal-fault", "--help"}, 0},
		{[]string{"policy", "--dir", dir}, 2},
		{[]string{"policy", "--dir", dir, "--group", "g", "--registration-id", "r"}, 2},
		{[]string{"policy", "--dir", dir, "--group", "g", "--key-types", "RSA"}, 2},
		{[]string{"policy", "--dir", dir, "--group", "g", "--validity", "1ms"}, 2},
		{[]string{"revoke", "--dir", dir}, 2},
		{[]string{"renewal-fault", "--dir", dir}, 2},
		{[]string{"renewal-fault", "--dir", dir, "--error-code", "200000"}, 2},
		{[]string{"renewal-fault", "--dir", dir, "--silent", "--times", "-1"}, 2},
		{[]string{"policy", "--dir", dir, "--group", "g"}, 1},
		{[]string{"revoke", "--dir", dir, "--device", "d"}, 1},
		{[]string{"renewal-fault", "--dir", dir, "--clear"}, 1},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			_, code := runCLI(t, tc.args...)
			assert.Equal(t, tc.code, code)
		})
	}
}
