package device_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/storage"
)

// tpmAttestation is a TPM-attestation device of s on a private swtpm, its identity key kept
// as keySpec says.
func tpmAttestation(t *testing.T, s *dpstest.Server, keySpec string) *config.Config {
	t.Helper()
	cfg := config.Default()
	cfg.Provisioning.GlobalEndpoint, cfg.Provisioning.IDScope = s.Addr(), s.IDScope()
	cfg.Attestation = config.Attestation{Method: "tpm", IdentityKey: keySpec, SRKHandle: config.DefaultSRKHandle}
	cfg.TPM.Device = "swtpm:" + attesttest.StartSWTPM(t)
	cfg.State.Dir = t.TempDir()
	return &cfg
}

func openTPMCredentials(t *testing.T, cfg *config.Config) *device.Credentials {
	t.Helper()
	creds, err := device.OpenCredentials(context.Background(), cfg)
	require.NoError(t, err)
	return creds
}

func standalone(s *dpstest.Server, cfg *config.Config) *device.StandaloneRegistration {
	return &device.StandaloneRegistration{Config: cfg, Store: storage.New(cfg.State.Dir),
		Provisioner: &device.DPS{Config: cfg, RootCAs: s.RootCAs()}}
}

// TestTPMAttestation: the EK read, the SRK created and persisted, the registration over HTTPS
// with DPS's challenge answered in the TPM, the identity key kept (at a handle, or as a
// keyfile) and found again at the next start, the state bound to the EK.
func TestTPMAttestation(t *testing.T) {
	for name, keySpec := range map[string]string{
		"persistent": config.DefaultTPMIdentityKey,
		"keyfile":    "tpmkey:" + filepath.Join(t.TempDir(), "dps.key"),
	} {
		t.Run(name, func(t *testing.T) {
			s := dpstest.NewServer(t)
			cfg := tpmAttestation(t, s, keySpec)

			creds := openTPMCredentials(t, cfg)
			require.NotNil(t, creds.Attested)
			assert.True(t, creds.Attested.SRK.Created, "swtpm has no SRK: it is made and persisted")
			assert.False(t, creds.Attested.Imported())
			assert.Equal(t, creds.Attested.EK.RegistrationID(), creds.RegistrationID, "the registration ID is the EK's")
			binding := creds.StateBinding()
			assert.Regexp(t, `^tpm:[0-9A-F]{64}$`, binding)
			require.NoError(t, s.AddIndividual(dpstest.Individual{RegistrationID: creds.RegistrationID, EndorsementKey: creds.Attested.EK.Public}))
			require.NoError(t, creds.Close())

			st, fresh, err := standalone(s, cfg).Provision(t.Context())
			require.NoError(t, err)
			assert.True(t, fresh)
			assert.Equal(t, "https", st.Transport, "TPM attestation goes over HTTPS under auto")
			assert.Equal(t, binding, st.Binding)
			assert.Equal(t, dpstest.Stats{Registrations: 2, Polls: 1, Assignments: 1}, s.Stats(),
				"the challenged request, then the signed one")

			again := openTPMCredentials(t, cfg)
			assert.False(t, again.Attested.SRK.Created, "the SRK persisted is reused")
			assert.True(t, again.Attested.Imported(), "the identity key is kept")
			require.NoError(t, again.Close()) // swtpm serves one client at a time
			_, fresh, err = standalone(s, cfg).Provision(t.Context())
			require.NoError(t, err)
			assert.False(t, fresh, "a restart makes no DPS call")
		})
	}
}

// TestTPMAttestationOtherEK: an enrollment naming another TPM's EK is refused for good.
func TestTPMAttestationOtherEK(t *testing.T) {
	s := dpstest.NewServer(t)
	cfg := tpmAttestation(t, s, config.DefaultTPMIdentityKey)
	other := openTPMCredentials(t, tpmAttestation(t, s, config.DefaultTPMIdentityKey))
	creds := openTPMCredentials(t, cfg)
	require.NoError(t, s.AddIndividual(dpstest.Individual{RegistrationID: creds.RegistrationID, EndorsementKey: other.Attested.EK.Public}))
	require.NoError(t, other.Close())
	require.NoError(t, creds.Close())

	_, _, err := standalone(s, cfg).Provision(t.Context())
	require.ErrorIs(t, err, device.ErrRefused)
}

// TestTPMHubTokensLeakNothing: a thousand hub tokens signed in the TPM leave no object or
// session loaded in it.
func TestTPMHubTokensLeakNothing(t *testing.T) {
	s := dpstest.NewServer(t)
	cfg := tpmAttestation(t, s, config.DefaultTPMIdentityKey)
	creds := openTPMCredentials(t, cfg)
	require.NoError(t, s.AddIndividual(dpstest.Individual{RegistrationID: creds.RegistrationID, EndorsementKey: creds.Attested.EK.Public}))
	require.NoError(t, creds.Close())
	_, _, err := standalone(s, cfg).Provision(t.Context())
	require.NoError(t, err)

	creds = openTPMCredentials(t, cfg)
	id, err := creds.Identity(time.Now())
	require.NoError(t, err)
	expiry := time.Now().Add(time.Hour)
	for range 1000 {
		_, err := hub.Password(t.Context(), "hub.example", "dev", id.Signer(), expiry)
		require.NoError(t, err)
	}
	require.NoError(t, creds.Close())

	tpm, err := attest.OpenTPM(context.Background(), cfg.TPM.Device)
	require.NoError(t, err)
	defer tpm.Close()
	assert.Empty(t, attesttest.LoadedHandles(t, tpm), "no transient object or session left behind")
}
