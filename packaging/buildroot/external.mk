include $(sort $(wildcard $(BR2_EXTERNAL_UNICITY_PATH)/package/*/*.mk))
