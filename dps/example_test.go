package dps_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/dps/dpstest"
)

// noWait lets the examples skip DPS's pacing: the emulator assigns at once, so the 2 s
// between polls that real DPS demands would only slow them down.
type noWait struct{}

func (noWait) Now() time.Time { return time.Now() }
func (noWait) After(time.Duration) <-chan time.Time {
	ch := make(chan time.Time, 1)
	ch <- time.Now()
	return ch
}

// exampleDPS starts the in-process DPS emulator and returns it with a certificate for
// registrationID from its factory CA. On a device the certificate is
// attest.Identity.TLSCertificate, its key in the TPM.
func exampleDPS(cfg dpstest.Config, registrationID string) (*dpstest.Server, tls.Certificate) {
	emulator, err := dpstest.New(cfg)
	if err != nil {
		log.Fatal(err)
	}
	if err := emulator.Start(); err != nil {
		log.Fatal(err)
	}
	leaf, err := emulator.FactoryCA().NewDevice(registrationID)
	if err != nil {
		log.Fatal(err)
	}
	return emulator, leaf.TLSCertificate()
}

// Register a device with an X.509 identity and learn which hub it belongs to. The
// emulator enrolls its factory CA as a group, as an OEM enrolls its own in Azure.
func ExampleRegister() {
	emulator, cert := exampleDPS(dpstest.DefaultConfig(), "gw-0001")
	defer emulator.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a, err := dps.Register(ctx, dps.Request{
		Endpoint:    emulator.Addr(), // global.azure-devices-provisioning.net for Azure
		IDScope:     emulator.IDScope(),
		RootCAs:     emulator.RootCAs(), // nil for Azure: its roots are built in
		Certificate: &cert,
		Clock:       noWait{},
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("hub:", a.AssignedHub)
	fmt.Println("device:", a.DeviceID)
	fmt.Println("substatus:", a.Substatus)
	// Output:
	// hub: hub.azure-devices.net
	// device: gw-0001
	// substatus: initialAssignment
}

// A device DPS does not know is refused for good: retrying cannot help, the enrollment is
// missing. Network trouble and throttling, on the other hand, are retried inside Register
// until its context ends.
func ExampleRegister_refused() {
	cfg := dpstest.DefaultConfig()
	cfg.NoFactoryEnrollment = true
	emulator, cert := exampleDPS(cfg, "gw-0002")
	defer emulator.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := dps.Register(ctx, dps.Request{
		Endpoint:    emulator.Addr(),
		IDScope:     emulator.IDScope(),
		RootCAs:     emulator.RootCAs(),
		Certificate: &cert,
		Clock:       noWait{},
	})
	fmt.Println("refused:", errors.Is(err, dps.ErrRefused))
	var e *dps.Error
	if errors.As(err, &e) {
		fmt.Println("temporary:", e.Temporary())
	}
	// Output:
	// refused: true
	// temporary: false
}
