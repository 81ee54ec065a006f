package attest_test

import (
	"context"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/dps/dpstest"
)

// BenchmarkTPMAttestation measures the device's side of a TPM attestation, with the TPM
// commands it sends (tpm-cmds/op), on a TPM without a persistent EK:
//   - first-boot: find the EK and make and persist the SRK, answer DPS's challenge, persist
//     the identity key, load it and sign the first SAS token;
//   - activation: answer the challenge, load the key from its keyfile, sign the first token.
//
// DPS's side (building the challenge) is not timed. Real TPMs are far slower, most of all at
// making RSA keys (the EK, the SRK): measure on the target board.
func BenchmarkTPMAttestation(b *testing.B) {
	ctx := context.Background()
	for _, tp := range tpms {
		b.Run(tp.name+"/first-boot", func(b *testing.B) {
			counted := &countingTPM{TPMCloser: tp.open(b)}
			tpm := attest.Locked(counted)
			commands := 0
			for i := 0; i < b.N; i++ {
				start := counted.commands
				ek, err := attest.ReadEndorsementKey(ctx, tpm)
				if err != nil {
					b.Fatal(err)
				}
				srk, err := attest.OpenSRK(ctx, tpm, 0)
				if err != nil || !srk.Created {
					b.Fatal(err, srk)
				}
				b.StopTimer()
				commands += counted.commands - start
				challenge, err := dpstest.NewTPMChallenge(ek.Public, srk.Public)
				if err != nil {
					b.Fatal(err)
				}
				start = counted.commands
				b.StartTimer()
				kf, err := attest.ImportIdentityKey(ctx, tpm, ek, srk, challenge.AuthenticationKey)
				if err != nil {
					b.Fatal(err)
				}
				if err := attest.PersistIdentityKey(ctx, tpm, kf, 0); err != nil {
					b.Fatal(err)
				}
				key, err := attest.LoadHMACKey(ctx, tpm, "tpmkey:handle=0x81000100")
				if err != nil {
					b.Fatal(err)
				}
				signFirstToken(b, key)
				b.StopTimer()
				commands += counted.commands - start
				key.Close()
				for _, h := range []tpm2.TPMHandle{attest.DefaultIdentityKeyHandle, attest.DefaultSRKHandle} {
					evict(b, tpm, h) // the next boot is a first one again
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(commands)/float64(b.N), "tpm-cmds/op")
		})
		b.Run(tp.name+"/activation", func(b *testing.B) {
			counted := &countingTPM{TPMCloser: tp.open(b)}
			tpm := attest.Locked(counted)
			d := newDevice(b, tpm, 0)
			dir := b.TempDir()
			commands := 0
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				challenge, err := dpstest.NewTPMChallenge(d.ek.Public, d.srk.Public)
				if err != nil {
					b.Fatal(err)
				}
				path := filepath.Join(dir, strconv.Itoa(i)+".key")
				start := counted.commands
				b.StartTimer()
				kf, err := attest.ImportIdentityKey(ctx, tpm, d.ek, d.srk, challenge.AuthenticationKey)
				if err != nil {
					b.Fatal(err)
				}
				if err := attest.WriteKeyfile(path, kf); err != nil {
					b.Fatal(err)
				}
				key, err := attest.LoadHMACKey(ctx, tpm, path)
				if err != nil {
					b.Fatal(err)
				}
				signFirstToken(b, key)
				key.Close()
				commands += counted.commands - start
			}
			b.ReportMetric(float64(commands)/float64(b.N), "tpm-cmds/op")
		})
	}
}

// BenchmarkHMACToken measures one SAS token signed in the TPM (one TPM2_HMAC).
func BenchmarkHMACToken(b *testing.B) {
	for _, tp := range tpms {
		b.Run(tp.name, func(b *testing.B) {
			counted := &countingTPM{TPMCloser: tp.open(b)}
			tpm := attest.Locked(counted)
			d := newDevice(b, tpm, 0)
			challenge, err := dpstest.NewTPMChallenge(d.ek.Public, d.srk.Public)
			if err != nil {
				b.Fatal(err)
			}
			key := d.importKey(b, tpm, challenge, attest.DefaultIdentityKeyHandle)
			start := counted.commands
			for b.Loop() {
				signFirstToken(b, key)
			}
			b.ReportMetric(float64(counted.commands-start)/float64(b.N), "tpm-cmds/op")
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "tokens/s")
		})
	}
}

func signFirstToken(b *testing.B, key *attest.HMACKey) {
	tpmSAS(b, key, "hub-1.azure-devices.net/devices/bench", time.Now().Add(time.Hour), "")
}

func evict(b *testing.B, tpm transport.TPM, h tpm2.TPMHandle) {
	rp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(tpm)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := (tpm2.EvictControl{Auth: tpm2.TPMRHOwner, ObjectHandle: &tpm2.NamedHandle{Handle: h, Name: rp.Name}, PersistentHandle: h}).Execute(tpm); err != nil {
		b.Fatal(err)
	}
}
