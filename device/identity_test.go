package device

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/sas"
)

func TestIdentityErrorsNeedingAPersonAreMarked(t *testing.T) {
	tests := []struct {
		name  string
		err   error
		fatal bool
	}{
		{"no TPM device node yet", fmt.Errorf("%w at /dev/tpmrm0: %w", attest.ErrNoTPM, fs.ErrNotExist), false},
		{"TPM device node not open to the agent yet", fmt.Errorf("%w at /dev/tpmrm0: %w", attest.ErrNoTPM, fs.ErrPermission), false},
		{"swtpm not listening yet", fmt.Errorf("%w at swtpm:127.0.0.1:2321: connection refused", attest.ErrNoTPM), false},
		{"TPM self-test running", fmt.Errorf("%w: cannot load: %w", attest.ErrInvalidKey, tpm2.TPMRCTesting), false},
		{"TPM busy", fmt.Errorf("cannot load key: %w", tpm2.TPMRCRetry), false},
		{"swtpm gone while loading the key", fmt.Errorf("%w: cannot load the keyfile: %w at swtpm:/run/swtpm.sock: %w", attest.ErrTPMUnavailable, attest.ErrNoTPM, fs.ErrNotExist), false},
		{"TPM busy creating the SRK", fmt.Errorf("%w: cannot create the storage root key: %w", attest.ErrTPMUnavailable, tpm2.TPMRCYielded), false},
		{"keyfile of another TPM", fmt.Errorf("%w: the TPM refused the keyfile: %w", attest.ErrInvalidKey, tpm2.TPMRCIntegrity), true},
		{"certificate of another key", fmt.Errorf("%w: issued for another key", attest.ErrKeyMismatch), true},
		{"expired", fmt.Errorf("%w: valid until yesterday", attest.ErrExpired), true},
		{"bad CN", fmt.Errorf("certificate CN: %w", attest.ErrBadRegistrationID), true},
		{"no certificate file", fmt.Errorf("%w: %w", attest.ErrInvalidIdentity, fs.ErrNotExist), true},
		{"clock", fmt.Errorf("%w: 1970", attest.ErrClockNotSet), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := classifyIdentityError(tt.err)
			assert.Equal(t, tt.fatal, errors.Is(err, ErrIdentity))
			assert.ErrorIs(t, err, tt.err)
			assert.Equal(t, tt.err.Error(), err.Error())
		})
	}
}

func writeKeyFile(t *testing.T, content string, mode os.FileMode) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "device.key")
	require.NoError(t, os.WriteFile(path, []byte(content), 0o600))
	require.NoError(t, os.Chmod(path, mode))
	return path
}

func TestReadSymmetricKey(t *testing.T) {
	key := bytes.Repeat([]byte{0xA5, 0x5A}, 32)
	b64 := base64.StdEncoding.EncodeToString(key)
	tests := []struct {
		name    string
		content string
		mode    os.FileMode
		want    []byte
		msg     string
	}{
		{"as the portal shows it", b64 + "\n", 0o600, key, ""},
		{"read-only", "  " + b64 + "\r\n", 0o400, key, ""},
		{"group-readable", b64, 0o640, nil, "mode 0640"},
		{"world-readable", b64, 0o604, nil, "mode 0604"},
		{"not base64", strings.ToUpper(hex.EncodeToString(key)) + "!", 0o600, nil, "base64"},
		{"too short", base64.StdEncoding.EncodeToString(key[:8]), 0o600, nil, "8 bytes"},
		{"empty", "", 0o600, nil, "0 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeKeyFile(t, tt.content, tt.mode)
			got, err := ReadSymmetricKey(path)
			if tt.msg == "" {
				require.NoError(t, err)
				assert.Equal(t, tt.want, got)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.msg)
			assert.Contains(t, err.Error(), path)
			assert.NotContains(t, err.Error(), b64[:16], "the key is never in an error")
			assert.NotContains(t, strings.ToUpper(err.Error()), strings.ToUpper(hex.EncodeToString(key[:8])))
		})
	}
	t.Run("missing", func(t *testing.T) {
		_, err := ReadSymmetricKey(filepath.Join(t.TempDir(), "nope.key"))
		assert.ErrorIs(t, err, fs.ErrNotExist)
	})
}

func symmetricConfig(t *testing.T, keyPath string, group bool) *config.Config {
	t.Helper()
	cfg, err := config.Parse("test.toml", fmt.Appendf(nil, `
[provisioning]
id_scope = "0ne00000000"
registration_id = "sas-0001"
[attestation]
method = "symmetric_key"
symmetric_key = %q
symmetric_key_group = %t
`, keyPath, group))
	require.NoError(t, err)
	return cfg
}

func TestSymmetricKeyCredentials(t *testing.T) {
	fileKey := bytes.Repeat([]byte{7}, 32)
	path := writeKeyFile(t, base64.StdEncoding.EncodeToString(fileKey), 0o600)
	for _, group := range []bool{false, true} {
		t.Run(fmt.Sprintf("group=%t", group), func(t *testing.T) {
			creds, err := OpenCredentials(context.Background(), symmetricConfig(t, path, group))
			require.NoError(t, err)
			defer creds.Close()
			assert.True(t, creds.Symmetric())
			want := fileKey
			if group {
				want = sas.DeviceKey(fileKey, "sas-0001")
			}
			id, err := creds.Identity(time.Now())
			require.NoError(t, err)
			assert.Equal(t, "sas-0001", id.RegistrationID)
			assert.Nil(t, id.X509)
			assert.Equal(t, want, id.SymmetricKey)
			assert.Equal(t, SymmetricKeyBinding(want), creds.StateBinding())
			for _, format := range []string{"%v", "%+v", "%#v", "%s", "%x"} {
				for _, v := range []any{id, creds} {
					printed := fmt.Sprintf(format, v)
					assert.NotContains(t, printed, base64.StdEncoding.EncodeToString(want)[:12], format)
					assert.NotContains(t, strings.ToLower(printed), hex.EncodeToString(want)[:12], format)
					assert.NotContains(t, printed, strings.Trim(fmt.Sprint(want[:8]), "[]"), format)
				}
			}
		})
	}
	t.Run("exposed key file", func(t *testing.T) {
		require.NoError(t, os.Chmod(path, 0o644))
		defer os.Chmod(path, 0o600)
		_, err := OpenCredentials(context.Background(), symmetricConfig(t, path, false))
		assert.ErrorIs(t, err, ErrIdentity, "exit 78: a person must fix the file's mode")
	})
}

func TestSymmetricKeyBinding(t *testing.T) {
	a, b := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)
	assert.Equal(t, SymmetricKeyBinding(a), SymmetricKeyBinding(bytes.Clone(a)), "stable")
	assert.NotEqual(t, SymmetricKeyBinding(a), SymmetricKeyBinding(b), "a new key makes a new binding")
	assert.Regexp(t, `^sas:[0-9A-F]{64}$`, SymmetricKeyBinding(a))
	for _, form := range []string{hex.EncodeToString(a), base64.StdEncoding.EncodeToString(a)} {
		assert.NotContains(t, strings.ToLower(SymmetricKeyBinding(a)), strings.ToLower(form[:16]))
	}
}
