package reliability_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/sas"
)

// secretForms is every way a secret could be printed: raw, hex (both cases), standard and
// URL base64 (padded or not), and, for PEM keys, each line of the PEM body.
func secretForms(secret []byte) []string {
	forms := []string{
		hex.EncodeToString(secret), strings.ToUpper(hex.EncodeToString(secret)),
		base64.StdEncoding.EncodeToString(secret), base64.RawStdEncoding.EncodeToString(secret),
		base64.URLEncoding.EncodeToString(secret), base64.RawURLEncoding.EncodeToString(secret),
	}
	if len(secret) >= 12 {
		forms = append(forms, string(secret))
	}
	return forms
}

// pemLines are the lines of a private key's PEM, but those that hold only its public half:
// the certificate carries those bytes too (the state file records the onboarding chain), and
// their base64 lines up with the certificate's one time in three.
func pemLines(p []byte, public crypto.PublicKey) []string {
	der, _ := x509.MarshalPKIXPublicKey(public)
	var shifted []string
	for i := range 3 {
		if len(der) > i {
			shifted = append(shifted, base64.StdEncoding.EncodeToString(der[i:]))
		}
	}
	var out []string
	for _, l := range strings.Split(string(p), "\n") {
		inner := l
		if len(inner) > 8 {
			inner = inner[4 : len(inner)-4] // away from the ends, whose characters mix bytes
		}
		if len(l) >= 32 && !strings.HasPrefix(l, "-----") && !slices.ContainsFunc(shifted, func(b string) bool { return strings.Contains(b, inner) }) {
			out = append(out, l)
		}
	}
	return out
}

func assertNoSecret(t *testing.T, where, text string, secrets map[string][]string) {
	t.Helper()
	for name, forms := range secrets {
		for _, f := range forms {
			if f != "" && strings.Contains(text, f) {
				t.Errorf("%s contains the %s (%q…)", where, name, f[:min(len(f), 12)])
			}
		}
	}
	for _, marker := range []string{"PRIVATE KEY", "SharedAccessSignature", "sig="} {
		assert.NotContains(t, text, marker, where)
	}
}

// exercise runs the real agent at debug level through provisioning, a hub connection, a
// restarted emulator (failures logged as warnings) and a forced reprovision, then the
// status, identity and check commands, and returns everything they printed or wrote.
func exercise(t *testing.T, e *emulator, g *gateway) map[string]string {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	agent, out, exited := g.runAgent(t, ctx, "--log-level", "debug")
	g.awaitPhase(t, agent, exited, device.PhaseConnected, 30*time.Second)
	e.restart()
	g.awaitPhase(t, agent, exited, device.PhaseConnected, 30*time.Second)
	rc, rout := g.command(ctx, "reprovision", "--force")
	require.NoError(t, rc.Run(), "%s", rout)
	texts := map[string]string{"reprovision's output": rout.String()}
	for _, args := range [][]string{{"status"}, {"status", "--json"}, {"identity"}, {"identity", "--json"}, {"check"}} {
		c, o := g.command(ctx, args...)
		c.Run()
		texts[strings.Join(args, " ")] = o.String()
	}
	agent.Process.Signal(os.Interrupt)
	<-exited
	texts["the agent's log"] = out.String()
	require.Contains(t, out.String(), "level=DEBUG", "the log is at debug level")
	require.Contains(t, out.String(), "level=WARN", "the log has failures in it")
	for name, path := range map[string]string{"the status file": filepath.Join(g.run, device.StatusFileName), "the state file": filepath.Join(g.state, "state.json")} {
		b, err := os.ReadFile(path)
		require.NoError(t, err)
		texts[name] = string(b)
	}
	return texts
}

// TestNoSecretInLogs runs the real agent at debug level with a software key (file:), with a
// symmetric key and with an enrollment group's key, and looks for the secret in everything
// it and the commands wrote: the private key in PEM, DER, hex and base64 and its scalar; the
// symmetric key and the derived device key raw, in hex and in base64; SAS signatures.
func TestNoSecretInLogs(t *testing.T) {
	t.Run("software key", func(t *testing.T) {
		e := startEmulator(t)
		g := x509Gateway(t, e, "gw-secret", "")
		keyPEM, err := os.ReadFile(filepath.Join(g.dir, "identity.key"))
		require.NoError(t, err)
		block, _ := pem.Decode(keyPEM)
		require.NotNil(t, block)
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			k, err = x509.ParseECPrivateKey(block.Bytes)
		}
		require.NoError(t, err)
		scalar, err := k.(*ecdsa.PrivateKey).Bytes()
		require.NoError(t, err)
		lines := pemLines(keyPEM, k.(*ecdsa.PrivateKey).Public())
		require.NotEmpty(t, lines, "the PEM lines that hold the private scalar")
		secrets := map[string][]string{
			"key PEM":    lines,
			"key DER":    secretForms(block.Bytes),
			"key scalar": secretForms(scalar),
		}
		for where, text := range exercise(t, e, g) {
			assertNoSecret(t, where, text, secrets)
		}
	})
	for _, group := range []bool{false, true} {
		name := map[bool]string{false: "symmetric key", true: "group key"}[group]
		t.Run(name, func(t *testing.T) {
			e := startEmulator(t)
			key := []byte("secret-" + name + "-0123456789abcdef")
			regID := map[bool]string{false: "sas-secret", true: "sas-member"}[group]
			enroll := []string{"enroll", "--dir", e.dir, "--registration-id", regID, "--symmetric-key", base64.StdEncoding.EncodeToString(key)}
			if group {
				enroll = []string{"enroll", "--dir", e.dir, "--group", "sas-group", "--symmetric-key", base64.StdEncoding.EncodeToString(key)}
			}
			out, err := exec.Command(e.bin, enroll...).CombinedOutput()
			require.NoError(t, err, "%s", out)
			g := newGateway(t, e)
			keyPath := filepath.Join(g.dir, "device.key")
			require.NoError(t, os.WriteFile(keyPath, []byte(base64.StdEncoding.EncodeToString(key)+"\n"), 0o600))
			g.writeConfig(t, e, fmt.Sprintf("registration_id = %q\n[attestation]\nmethod = \"symmetric_key\"\nsymmetric_key = %q\nsymmetric_key_group = %t\n", regID, keyPath, group))
			secrets := map[string][]string{"symmetric key": secretForms(key)}
			if group {
				secrets["derived key"] = secretForms(sas.DeviceKey(key, regID))
			}
			for where, text := range exercise(t, e, g) {
				assertNoSecret(t, where, text, secrets)
			}
		})
	}
}

// TestNoSecretInSASMessages: what the dps client hands the agent's log (progress messages and
// errors) for a right key, a wrong one and a group-derived one carries none of them.
func TestNoSecretInSASMessages(t *testing.T) {
	s := dpstest.NewServer(t, func(c *dpstest.Config) { c.PollLimit = 0 })
	right, wrong, group := []byte("right-key-0123456789abcdef"), []byte("wrong-key-0123456789abcdef"), []byte("group-key-0123456789abcdef")
	require.NoError(t, s.AddIndividual(dpstest.Individual{RegistrationID: "sas-1", SymmetricKey: right}))
	require.NoError(t, s.AddGroup(dpstest.Group{ID: "sas-group", SymmetricKey: group}))
	derived := sas.DeviceKey(group, "sas-2")
	secrets := map[string][]string{"right key": secretForms(right), "wrong key": secretForms(wrong), "group key": secretForms(group), "derived key": secretForms(derived)}
	for _, tc := range []struct {
		regID string
		key   []byte
		group bool
		ok    bool
	}{{"sas-1", right, false, true}, {"sas-1", wrong, false, false}, {"sas-2", group, true, true}, {"sas-3", wrong, true, false}} {
		var msgs []string
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err := dps.Register(ctx, dps.Request{
			Endpoint: s.Addr(), IDScope: s.IDScope(), RegistrationID: tc.regID, Transport: dial.TransportMQTT,
			RootCAs: s.RootCAs(), SymmetricKey: tc.key, GroupKey: tc.group, Clock: scaledClock{},
			Progress: func(p dps.Progress) {
				msgs = append(msgs, p.Message)
				if p.Err != nil {
					msgs = append(msgs, p.Err.Error())
				}
			},
		})
		cancel()
		if tc.ok {
			require.NoError(t, err, tc.regID)
		} else {
			require.Error(t, err)
			msgs = append(msgs, err.Error())
		}
		assertNoSecret(t, "dps messages for "+tc.regID, strings.Join(msgs, "\n"), secrets)
	}
}
