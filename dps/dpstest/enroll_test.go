package dpstest_test

import (
	"crypto/hmac"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/sas"
)

// sasToken builds a DPS SAS token (protocol.md §1.2); lowerEscapes writes %2f as ESDK-C does.
func sasToken(scope, regID string, key []byte, expiry time.Time, lowerEscapes bool) string {
	sr := url.QueryEscape(scope + "/registrations/" + regID)
	if lowerEscapes {
		sr = strings.ReplaceAll(sr, "%2F", "%2f")
	}
	se := strconv.FormatInt(expiry.Unix(), 10)
	m := hmac.New(sha256.New, key)
	m.Write([]byte(sr + "\n" + se))
	sig := base64.StdEncoding.EncodeToString(m.Sum(nil))
	return "SharedAccessSignature sr=" + sr + "&sig=" + url.QueryEscape(sig) + "&se=" + se + "&skn=registration"
}

func tlsCert(l *pki.Leaf) *tls.Certificate {
	tc := l.TLSCertificate()
	return &tc
}

func TestX509Enrollments(t *testing.T) {
	reg := &assignments{}
	s := dpstest.NewServer(t, fast, func(c *dpstest.Config) { c.Registrar = reg })

	oem, err := pki.NewRoot("OEM root")
	require.NoError(t, err)
	line, err := oem.NewIntermediate("OEM line 7")
	require.NoError(t, err)
	require.NoError(t, s.AddGroup(dpstest.Group{ID: "oem-root", CA: oem.Certificate,
		Policy: dpstest.Policy{Hubs: []string{"root.azure-devices.net"}}}))
	require.NoError(t, s.AddGroup(dpstest.Group{ID: "oem-line", CA: line.Certificate,
		Policy: dpstest.Policy{Hubs: []string{"line.azure-devices.net"}}}))

	stranger, err := pki.NewRoot("stranger")
	require.NoError(t, err)
	selfish, err := stranger.NewDevice("pinned-1")
	require.NoError(t, err)
	require.NoError(t, s.AddIndividual(dpstest.Individual{RegistrationID: "pinned-1",
		Thumbprint: certcodec.Thumbprint(selfish.Certificate()), DeviceID: "custom-device-id"}))
	sha1Dev, err := stranger.NewDevice("pinned-sha1")
	require.NoError(t, err)
	sum := sha1.Sum(sha1Dev.Certificate().Raw)
	require.NoError(t, s.AddIndividual(dpstest.Individual{RegistrationID: "pinned-sha1",
		Thumbprint: strings.ToLower(fmt.Sprintf("%x", sum[:]))}))
	// An individual enrollment wins over a group that would also admit the device.
	both, err := line.NewDevice("both")
	require.NoError(t, err)
	require.NoError(t, s.AddIndividual(dpstest.Individual{RegistrationID: "both",
		Thumbprint: certcodec.Thumbprint(both.Certificate()), Policy: dpstest.Policy{Hubs: []string{"individual.azure-devices.net"}}}))

	lineDev, err := line.NewDevice("line-dev")
	require.NoError(t, err)
	rootDev, err := oem.NewDevice("root-dev")
	require.NoError(t, err)
	line8, err := oem.NewIntermediate("OEM line 8, not enrolled")
	require.NoError(t, err)
	line8Dev, err := line8.NewDevice("line8-dev")
	require.NoError(t, err)

	for _, tc := range []struct {
		name, regID string
		cert        *tls.Certificate
		hub, device string
		thumbprint  string
		ca          *x509.Certificate
	}{
		{"factory group", "factory-dev", factoryCert(t, s, "factory-dev"), dpstest.DefaultHub, "factory-dev", "", s.FactoryCA().Certificate},
		{"nearest group CA wins", "line-dev", tlsCert(lineDev), "line.azure-devices.net", "line-dev", certcodec.Thumbprint(lineDev.Certificate()), line.Certificate},
		{"group on a root through an intermediate", "line8-dev", tlsCert(line8Dev), "root.azure-devices.net", "line8-dev", certcodec.Thumbprint(line8Dev.Certificate()), oem.Certificate},
		{"group on a root", "root-dev", tlsCert(rootDev), "root.azure-devices.net", "root-dev", certcodec.Thumbprint(rootDev.Certificate()), oem.Certificate},
		{"individual by SHA-256 thumbprint with device ID", "pinned-1", tlsCert(selfish), dpstest.DefaultHub, "custom-device-id", certcodec.Thumbprint(selfish.Certificate()), nil},
		{"individual by SHA-1 thumbprint", "pinned-sha1", tlsCert(sha1Dev), dpstest.DefaultHub, "pinned-sha1", certcodec.Thumbprint(sha1Dev.Certificate()), nil},
		{"individual before group", "both", tlsCert(both), "individual.azure-devices.net", "both", certcodec.Thumbprint(both.Certificate()), nil},
		{"case-insensitive registration ID", "FACTORY-DEV-2", factoryCert(t, s, "factory-dev-2"), dpstest.DefaultHub, "FACTORY-DEV-2", "", s.FactoryCA().Certificate},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := mustDial(t, s, dialOpts{regID: tc.regID, cert: tc.cert})
			r := d.provision(tc.regID)
			require.Equal(t, "assigned", r.body.Status, "%s", r.raw)
			assert.Equal(t, tc.hub, r.body.RegistrationState.AssignedHub)
			assert.Equal(t, tc.device, r.body.RegistrationState.DeviceID)
			a := reg.last(t)
			assert.Equal(t, tc.device, a.DeviceID)
			assert.Equal(t, tc.ca, a.Auth.CA)
			if tc.thumbprint != "" {
				assert.Equal(t, tc.thumbprint, a.Auth.Thumbprint)
			}
		})
	}

	t.Run("refused", func(t *testing.T) {
		strangerDev, err := stranger.NewDevice("stranger-dev")
		require.NoError(t, err)
		noIntermediate := tlsCert(line8Dev)
		noIntermediate.Certificate = noIntermediate.Certificate[:1]
		expired, err := s.FactoryCA().NewDevice("expired", pki.WithValidity(time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour)))
		require.NoError(t, err)
		serverOnly, err := s.FactoryCA().IssueServer([]string{"server-cert"})
		require.NoError(t, err)
		for _, tc := range []struct {
			name, regID string
			cert        *tls.Certificate
			username    string
		}{
			{"unknown CA", "stranger-dev", tlsCert(strangerDev), ""},
			{"no certificate", "nobody", nil, ""},
			{"chain without the intermediate", "line8-dev", noIntermediate, ""},
			{"expired certificate", "expired", tlsCert(expired), ""},
			{"server certificate", "server-cert", tlsCert(serverOnly), ""},
		} {
			t.Run(tc.name, func(t *testing.T) {
				before := s.Stats().Refused
				_, err := dial(t, s, dialOpts{regID: tc.regID, cert: tc.cert, username: tc.username})
				var ce *connectError
				require.ErrorAs(t, err, &ce)
				assert.Equal(t, byte(5), ce.code)
				assert.Equal(t, before+1, s.Stats().Refused)
			})
		}
	})

	t.Run("wrong ID scope", func(t *testing.T) {
		// Checked before the credentials, whatever they are, and answered as DPS does:
		// "server unavailable".
		for _, cert := range []*tls.Certificate{factoryCert(t, s, "factory-dev"), nil} {
			before := s.Stats().Refused
			_, err := dial(t, s, dialOpts{regID: "factory-dev", cert: cert, username: "0neWRONG000/registrations/factory-dev/api-version=2019-03-31"})
			var ce *connectError
			require.ErrorAs(t, err, &ce)
			assert.Equal(t, byte(3), ce.code)
			assert.Equal(t, before+1, s.Stats().Refused)
		}
	})

	t.Run("malformed username", func(t *testing.T) {
		for _, u := range []string{"/registrations/x/api-version=2019-03-31", "scope-only", s.IDScope() + "/registrations/x", s.IDScope() + "/registrations/x/api-version=latest", s.IDScope() + "/registrations//api-version=2019-03-31"} {
			_, err := dial(t, s, dialOpts{regID: "x", cert: factoryCert(t, s, "x"), username: u})
			var ce *connectError
			require.ErrorAs(t, err, &ce, "username %q", u)
			assert.Equal(t, byte(4), ce.code, "username %q", u)
		}
	})

	t.Run("CN differs from registration ID", func(t *testing.T) {
		d := mustDial(t, s, dialOpts{regID: "claimed-id", cert: factoryCert(t, s, "real-cn")})
		r := d.register("claimed-id")
		assert.Equal(t, 401, r.status)
		assert.Equal(t, 401002, r.body.ErrorCode)
		assert.Equal(t, "Invalid certificate.", r.body.Message, "the service does not say why")
		attempts := s.Attempts("claimed-id")
		require.Len(t, attempts, 1)
		assert.Equal(t, dpstest.OutcomeRefused, attempts[0].Outcome)
		assert.Contains(t, attempts[0].Reason, `"real-cn"`, "the history does")
		assert.Contains(t, attempts[0].Reason, `"claimed-id"`)
	})
}

func TestUnknownDevice401(t *testing.T) {
	s := dpstest.NewServer(t, fast, func(c *dpstest.Config) { c.UnknownDevice = dpstest.Refuse401 })
	stranger, err := pki.NewRoot("stranger")
	require.NoError(t, err)
	dev, err := stranger.NewDevice("stranger-dev")
	require.NoError(t, err)
	d := mustDial(t, s, dialOpts{regID: "stranger-dev", cert: tlsCert(dev)})
	r := d.register("stranger-dev")
	assert.Equal(t, 401, r.status)
	assert.Equal(t, 401002, r.body.ErrorCode)
	assert.Equal(t, "Invalid certificate.", r.body.Message)
	r = d.poll("4.0000000000000000.00000000-0000-4000-8000-000000000000")
	assert.Equal(t, 401, r.status)
	assert.Equal(t, int64(3), s.Stats().Refused, "the connection and both requests")
	assert.Equal(t, int64(1), s.Stats().Connections)
	attempts := s.Attempts("STRANGER-dev")
	require.Len(t, attempts, 1, "the register request; polls belong to operations")
	assert.Equal(t, dpstest.OutcomeRefused, attempts[0].Outcome)
	assert.Equal(t, "certificate matches no enrollment", attempts[0].Reason)

	// A SAS device is told "Unauthorized", as DPS tells it.
	exp := time.Now().Add(time.Hour)
	d = mustDial(t, s, dialOpts{regID: "sas-stranger", password: sasToken(s.IDScope(), "sas-stranger", []byte("no such key"), exp, false)})
	r = d.register("sas-stranger")
	assert.Equal(t, 401, r.status)
	assert.Equal(t, 401000, r.body.ErrorCode)
	assert.Equal(t, "Unauthorized", r.body.Message)
	assert.Equal(t, "SAS signature matches no enrollment", s.Attempts("sas-stranger")[0].Reason)
}

func TestSymmetricKeyEnrollments(t *testing.T) {
	now := newClock()
	reg := &assignments{}
	s := dpstest.NewServer(t, fast, func(c *dpstest.Config) { c.Registrar = reg; c.Now = now.Now })
	indKey := []byte("individual-key-0123456789abcdef!")
	groupKey := []byte("group-key-0123456789abcdef012345")
	require.NoError(t, s.AddIndividual(dpstest.Individual{RegistrationID: "sas-ind", SymmetricKey: indKey}))
	require.NoError(t, s.AddGroup(dpstest.Group{ID: "sas-group", SymmetricKey: groupKey}))
	exp := now.Now().Add(time.Hour)

	for _, tc := range []struct {
		name, regID string
		key         []byte
		lower       bool
		group       string
	}{
		{"individual", "sas-ind", indKey, false, ""},
		{"individual, ESDK-C lower-case escapes", "sas-ind", indKey, true, ""},
		{"group-derived key", "sas-member-1", sas.DeviceKey(groupKey, "sas-member-1"), false, "sas-group"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := mustDial(t, s, dialOpts{regID: tc.regID, password: sasToken(s.IDScope(), tc.regID, tc.key, exp, tc.lower)})
			r := d.provision(tc.regID)
			require.Equal(t, "assigned", r.body.Status, "%s", r.raw)
			assert.Nil(t, r.body.RegistrationState.X509)
			assert.Contains(t, string(r.raw), `"symmetricKey":{`+map[bool]string{true: `"enrollmentGroupId":"sas-group"`, false: ""}[tc.group != ""]+`}`)
			assert.Equal(t, tc.key, reg.last(t).Auth.SymmetricKey)
			assert.Empty(t, reg.last(t).Auth.Thumbprint)
		})
	}

	for _, tc := range []struct {
		name     string
		password string
	}{
		{"wrong key", sasToken(s.IDScope(), "sas-ind", []byte("not the key"), exp, false)},
		{"group key used directly", sasToken(s.IDScope(), "sas-member-2", groupKey, exp, false)},
		{"expired", sasToken(s.IDScope(), "sas-ind", indKey, now.Now().Add(-time.Second), false)},
		{"other resource", sasToken(s.IDScope(), "someone-else", indKey, exp, false)},
		{"not a SAS token", "hunter2"},
		{"garbled", "SharedAccessSignature sr=%zz&sig=!!&se=soon"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			regID := "sas-ind"
			if strings.Contains(tc.name, "group") {
				regID = "sas-member-2"
			}
			_, err := dial(t, s, dialOpts{regID: regID, password: tc.password})
			var ce *connectError
			require.ErrorAs(t, err, &ce)
			assert.Equal(t, byte(5), ce.code)
		})
	}
}

func TestEnrollmentAdministration(t *testing.T) {
	s := dpstest.NewServer(t, fast)
	ca, err := pki.NewRoot("ca")
	require.NoError(t, err)
	leafOnly, err := ca.NewDevice("leaf")
	require.NoError(t, err)
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"group without credential", s.AddGroup(dpstest.Group{ID: "g"})},
		{"group with both credentials", s.AddGroup(dpstest.Group{ID: "g", CA: ca.Certificate, SymmetricKey: []byte("k")})},
		{"group on a leaf", s.AddGroup(dpstest.Group{ID: "g", CA: leafOnly.Certificate()})},
		{"group without ID", s.AddGroup(dpstest.Group{CA: ca.Certificate})},
		{"individual without credential", s.AddIndividual(dpstest.Individual{RegistrationID: "r"})},
		{"individual without ID", s.AddIndividual(dpstest.Individual{Thumbprint: "AA"})},
	} {
		t.Run(tc.name, func(t *testing.T) { assert.Error(t, tc.err) })
	}
	assert.ErrorIs(t, s.SetEnabled("nope", false), dpstest.ErrNotFound)
	assert.ErrorIs(t, s.RemoveEnrollment("nope"), dpstest.ErrNotFound)
	assert.ErrorIs(t, s.DeleteRegistration("nope"), dpstest.ErrNotFound)

	t.Run("removing the enrollment refuses its devices", func(t *testing.T) {
		d := mustDial(t, s, dialOpts{regID: "gone", cert: factoryCert(t, s, "gone")})
		require.NoError(t, s.RemoveEnrollment("factory"))
		r := d.register("gone")
		assert.Equal(t, 401, r.status)
		_, err := dial(t, s, dialOpts{regID: "gone", cert: factoryCert(t, s, "gone")})
		assert.Error(t, err)
	})
}

func TestDisabled(t *testing.T) {
	s := dpstest.NewServer(t, fast)
	stranger, err := pki.NewRoot("stranger")
	require.NoError(t, err)
	// An individual enrollment that is disabled refuses its device even though the enabled
	// factory group would admit it (DOC-X509: the first match decides).
	both, err := s.FactoryCA().NewDevice("both")
	require.NoError(t, err)
	require.NoError(t, s.AddIndividual(dpstest.Individual{RegistrationID: "both", Thumbprint: certcodec.Thumbprint(both.Certificate()),
		Policy: dpstest.Policy{Disabled: true}}))
	pinned, err := stranger.NewDevice("pinned")
	require.NoError(t, err)
	require.NoError(t, s.AddIndividual(dpstest.Individual{RegistrationID: "pinned", Thumbprint: certcodec.Thumbprint(pinned.Certificate())}))

	disabledBody := func(regID string) string {
		return `{"operationId":"","status":"disabled","registrationState":{"registrationId":"` + regID + `","status":"disabled"}}`
	}
	t.Run("individual disabled", func(t *testing.T) {
		d := mustDial(t, s, dialOpts{regID: "both", cert: tlsCert(both)})
		r := d.register("both")
		assert.Equal(t, 200, r.status)
		assert.Equal(t, -1, r.retryAfter)
		assert.JSONEq(t, disabledBody("both"), string(r.raw))
	})
	t.Run("group disabled, then enabled again", func(t *testing.T) {
		d := mustDial(t, s, dialOpts{regID: "member", cert: factoryCert(t, s, "member")})
		require.NoError(t, s.SetEnabled("factory", false))
		assert.JSONEq(t, disabledBody("member"), string(d.register("member").raw))
		require.NoError(t, s.SetEnabled("factory", true))
		assert.Equal(t, "assigned", d.provision("member").body.Status)
	})
	t.Run("disabled while assigning", func(t *testing.T) {
		d := mustDial(t, s, dialOpts{regID: "midway", cert: factoryCert(t, s, "midway")})
		op := d.register("midway").body.OperationID
		require.NoError(t, s.SetEnabled("factory", false))
		defer s.SetEnabled("factory", true)
		r := d.poll(op)
		assert.Equal(t, 200, r.status)
		assert.Equal(t, "disabled", r.body.Status)
		assert.Equal(t, op, r.body.OperationID)
	})
	t.Run("individual disabled at runtime", func(t *testing.T) {
		d := mustDial(t, s, dialOpts{regID: "pinned", cert: tlsCert(pinned)})
		require.NoError(t, s.SetEnabled("pinned", false))
		assert.Equal(t, "disabled", d.register("pinned").body.Status)
	})
}
