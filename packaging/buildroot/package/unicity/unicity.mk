################################################################################
#
# unicity
#
################################################################################

# Products pin the tag or commit they ship.
UNICITY_VERSION = main
UNICITY_SITE = https://github.com/unicity-iot/unicity.git
UNICITY_SITE_METHOD = git
# The repository carries no license file yet: set these when it does.
UNICITY_LICENSE = PROPRIETARY
UNICITY_GOMOD = github.com/unicity-iot/unicity
# One target: golang-package names the binary after it and installs it as /usr/bin/unicity.
UNICITY_BUILD_TARGETS = cmd/unicity
# The agent links no C code: built as by `make cross`, with the Makefile's version variables.
# CommitUnix is the agent's lower bound for a sane clock; Buildroot strips at target-finalize.
UNICITY_GO_ENV = CGO_ENABLED=0
UNICITY_LDFLAGS = \
	-X $(UNICITY_GOMOD)/internal/version.Version=$(UNICITY_VERSION) \
	-X $(UNICITY_GOMOD)/internal/version.Commit=$(UNICITY_VERSION) \
	-X $(UNICITY_GOMOD)/internal/version.CommitUnix=$(SOURCE_DATE_EPOCH)

# The service user, in tss: the group that may open /dev/tpmrm0 (tpm2-tss installs the udev
# rule giving it the device). makeusers creates tss if no package did.
define UNICITY_USERS
	unicity -1 unicity -1 * /var/lib/unicity - tss unicity device agent
endef

define UNICITY_PERMISSIONS
	/var/lib/unicity d 700 unicity unicity - - - - -
endef

define UNICITY_INSTALL_CONFIG
	$(INSTALL) -D -m 0644 $(@D)/packaging/config.toml $(TARGET_DIR)/etc/unicity/config.toml
	$(INSTALL) -d -m 0700 $(TARGET_DIR)/var/lib/unicity
endef
UNICITY_POST_INSTALL_TARGET_HOOKS += UNICITY_INSTALL_CONFIG

# Buildroot enables installed units through systemd's presets.
define UNICITY_INSTALL_INIT_SYSTEMD
	$(INSTALL) -D -m 0644 $(@D)/packaging/systemd/unicity.service \
		$(TARGET_DIR)/usr/lib/systemd/system/unicity.service
	$(INSTALL) -D -m 0644 $(@D)/packaging/systemd/unicity.sysusers \
		$(TARGET_DIR)/usr/lib/sysusers.d/unicity.conf
	$(INSTALL) -D -m 0644 $(@D)/packaging/systemd/unicity.tmpfiles \
		$(TARGET_DIR)/usr/lib/tmpfiles.d/unicity.conf
endef

$(eval $(golang-package))
